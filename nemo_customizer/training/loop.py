"""The training loop: epochs of optimizer steps, validation, early stopping, best-checkpoint callback, metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from nemo_customizer.config.schema import HyperparametersConfig
from nemo_customizer.data import (collate, collate_packed, iterate_micro_batches, iterate_validation_micro_batches,
                                  steps_per_epoch)
from nemo_customizer.data.examples import TokenizedExample
from nemo_customizer.data.packing import PackingPlan
from nemo_customizer.distributed.parallel import ParallelLayout
from nemo_customizer.training.early_stopping import EarlyStopping
from nemo_customizer.training.metrics import MetricsLog, ProgressBar
from nemo_customizer.training.step import train_step, validation_loss


@dataclass
class TrainingJob:
    """Everything the loop needs, built by ``api.run``."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    train_examples: Sequence[TokenizedExample]
    val_examples: Sequence[TokenizedExample]
    hyperparameters: HyperparametersConfig
    layout: ParallelLayout
    pad_id: int
    pad_to_multiple_of: int
    metrics: MetricsLog
    progress: ProgressBar
    save_best: Callable[[], None]
    """Called (on every rank: saving is collective) when validation loss reaches a new best."""
    packing: Optional[PackingPlan] = None
    """Train on packed bins of ``train_examples`` with the plan's batch sizes (validation stays unpacked)."""


@dataclass
class FitResult:
    steps: int = 0
    epochs_completed: int = 0
    best_val_loss: float = math.inf
    best_epoch: Optional[int] = None
    best_step: Optional[int] = None
    final_train_loss: float = math.nan
    final_val_loss: float = math.nan
    stopped_early: bool = False
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    last_validated_step: int = 0


def planned_steps(n_train: int, hp: HyperparametersConfig, packing: Optional[PackingPlan] = None) -> int:
    """Optimizer steps the schedule is built for: epochs × steps per epoch, capped by ``max_steps``."""
    per_epoch = packing.steps_per_epoch if packing is not None else steps_per_epoch(n_train, hp.batch_size)
    total = hp.epochs * per_epoch
    return min(total, hp.max_steps) if hp.max_steps is not None else total


def _training_batches(job: TrainingJob, items: Sequence, epoch: int):
    """This rank's collated micro batches for each optimizer step of ``epoch``: padded examples or packed bins."""
    hp, layout, plan = job.hyperparameters, job.layout, job.packing
    steps = iterate_micro_batches(
        items, global_batch_size=plan.global_batch_size if plan else hp.batch_size,
        micro_batch_size=plan.micro_batch_size if plan else hp.micro_batch_size,
        dp_rank=layout.data_parallel_rank, dp_size=layout.data_parallel_size, seed=hp.seed, epoch=epoch,
    )
    to_batch = collate_packed if plan else collate
    for micro in steps:
        yield [to_batch(m, pad_id=job.pad_id, pad_to_multiple_of=job.pad_to_multiple_of) for m in micro]


def _validation_batches(job: TrainingJob):
    hp, layout = job.hyperparameters, job.layout
    for micro in iterate_validation_micro_batches(
        job.val_examples, global_batch_size=hp.batch_size, micro_batch_size=hp.micro_batch_size,
        dp_rank=layout.data_parallel_rank, dp_size=layout.data_parallel_size,
    ):
        yield [collate(m, pad_id=job.pad_id, pad_to_multiple_of=job.pad_to_multiple_of) for m in micro]


def _validate(job: TrainingJob, result: FitResult, stopper: EarlyStopping, epoch: int, step: int) -> None:
    result.last_validated_step = step
    if not job.val_examples:
        return
    val = validation_loss(job.model, _validation_batches(job), job.layout.device)
    result.final_val_loss = val
    improved = stopper.update(val, step)
    if improved:
        result.best_val_loss, result.best_epoch, result.best_step = val, epoch, step
        job.save_best()
    job.metrics.write(event="validation", step=step, epoch=epoch, val_loss=val, best=improved)
    job.progress.message(f"validation  epoch {epoch} step {step}: val_loss {val:.4f}"
                         + ("  (best, saved)" if improved else f"  (best {stopper.best:.4f})"))


def fit(job: TrainingJob) -> FitResult:
    hp, layout = job.hyperparameters, job.layout
    total_steps = planned_steps(len(job.train_examples), hp, job.packing)
    # Packed: the shuffled unit is a bin (bins are fixed for the job; their order changes every epoch).
    items = job.packing.take(job.train_examples) if job.packing else job.train_examples
    stopper = EarlyStopping(hp.early_stopping.patience, hp.early_stopping.min_delta, hp.early_stopping.enabled)
    result = FitResult()
    tokens_total, seconds_total = 0, 0.0
    for epoch in range(hp.epochs):
        if result.steps >= total_steps:
            break
        for batches in _training_batches(job, items, epoch):
            if result.steps >= total_steps:
                break
            started = time.perf_counter()
            out = train_step(job.model, job.optimizer, job.scheduler, batches, layout.device)
            elapsed = time.perf_counter() - started
            result.steps += 1
            tokens_total += out.real_tokens
            seconds_total += elapsed
            if not math.isfinite(out.loss):
                raise FloatingPointError(f"training loss is {out.loss} at step {result.steps}; lower the "
                                         "learning_rate or check the data")
            result.final_train_loss = out.loss
            job.metrics.write(event="train", step=result.steps, epoch=epoch, loss=out.loss,
                              lr=out.learning_rate, grad_norm=out.grad_norm, loss_tokens=out.loss_tokens,
                              tokens=out.real_tokens, tokens_per_s=out.real_tokens / elapsed, skipped=out.skipped)
            job.progress.update(result.steps, out.loss, tokens_total / max(seconds_total, 1e-9))
            if hp.val_check_interval and result.steps % hp.val_check_interval == 0:
                _validate(job, result, stopper, epoch, result.steps)
                if stopper.should_stop:
                    break
        else:
            # End of a full epoch: validate (unless the interval just did at this very step).
            if result.steps > result.last_validated_step:
                _validate(job, result, stopper, epoch, result.steps)
            result.epochs_completed = epoch + 1
        if stopper.should_stop:
            result.stopped_early = True
            job.progress.message(f"early stopping: no val_loss improvement > {stopper.min_delta} in "
                                 f"{stopper.patience} validations")
            break
    if result.steps > result.last_validated_step and not result.stopped_early:
        _validate(job, result, stopper, epoch, result.steps)  # ended mid-epoch (max_steps): judge the final weights
    if not job.val_examples:
        job.save_best()  # no validation data: the final weights are the result
    result.tokens_per_second = tokens_total / max(seconds_total, 1e-9)
    result.train_seconds = seconds_total
    job.progress.close()
    return result
