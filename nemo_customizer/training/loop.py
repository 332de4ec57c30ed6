"""The training loop: epochs of optimizer steps, validation, early stopping, best-checkpoint callback, metrics,
a clean stop on SIGTERM/SIGINT, and a stop (before the update) on a NaN/inf loss or gradient."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch

from nemo_customizer.config.schema import HyperparametersConfig
from nemo_customizer.data import (collate, collate_packed, iterate_micro_batches, iterate_validation_micro_batches,
                                  steps_per_epoch)
from nemo_customizer.data.examples import TokenizedExample
from nemo_customizer.data.packing import PackingPlan
from nemo_customizer.distributed.collectives import all_reduce_sum
from nemo_customizer.distributed.parallel import ParallelLayout
from nemo_customizer.training.early_stopping import EarlyStopping
from nemo_customizer.training.metrics import MetricsLog, ProgressBar
from nemo_customizer.training.signals import StopSignals
from nemo_customizer.training.position import LoopPosition
from nemo_customizer.training.status import JobStatus
from nemo_customizer.training.step import NonFiniteStep, QueuedStep, queue_step, validation_loss


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
    status: JobStatus = field(default_factory=lambda: JobStatus(None))
    """Told when training starts (the metrics records feed it the rest)."""
    stop: StopSignals = field(default_factory=StopSignals)
    """Entered for the loop (``api.run`` enters it earlier, so a signal during model loading counts too)."""
    save_checkpoint: Optional[Callable[[LoopPosition], None]] = None
    """Writes a resumable checkpoint (on every rank: collective) after each validation and when a stop signal ends
    training."""
    resume: Optional[LoopPosition] = None
    """Where a restored checkpoint left off: the loop continues from there (the weights are already loaded)."""
    graphs: Optional[object] = None
    """A ``training.graphs.GraphedForwardBackward`` of ``model``: packed training micro batches replay CUDA graphs."""


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
    stopped_by_signal: Optional[int] = None
    """SIGTERM or SIGINT, when a stop signal or a cancel request (as SIGTERM) ended training (status ``cancelled``)."""
    stop_reason: str = ""
    """What ended training early: ``SIGTERM``, ``SIGINT`` or ``cancel request``."""


def planned_steps(n_train: int, hp: HyperparametersConfig, packing: Optional[PackingPlan] = None) -> int:
    """Optimizer steps the schedule is built for: epochs × steps per epoch, capped by ``max_steps``."""
    total = hp.epochs * _steps_per_epoch(n_train, hp, packing)
    return min(total, hp.max_steps) if hp.max_steps is not None else total


def _steps_per_epoch(n_train: int, hp: HyperparametersConfig, packing: Optional[PackingPlan]) -> int:
    return packing.steps_per_epoch if packing is not None else steps_per_epoch(n_train, hp.batch_size)


def _stop_requested(job: TrainingJob, result: FitResult) -> bool:
    """Whether any rank got a stop signal or a cancel request (recorded in ``result``; SIGTERM wins over SIGINT, a
    request counts as SIGTERM); one all-reduce, so every rank stops before the same step."""
    received = job.stop.received
    term, interrupt, request = all_reduce_sum([float(received == signal.SIGTERM), float(received == signal.SIGINT),
                                               float(job.stop.cancel_requested())])
    result.stopped_by_signal = signal.SIGTERM if term or request else signal.SIGINT if interrupt else None
    result.stop_reason = ("SIGTERM" if term else "SIGINT" if interrupt else "cancel request" if request else "")
    return result.stopped_by_signal is not None


@dataclass
class _Queued:
    """A step queued on the device whose numbers the loop has not read yet."""

    step: int
    epoch: int
    work: QueuedStep
    queued_at: float


def _queue(job: TrainingJob, batches, step: int, epoch: int) -> _Queued:
    queued_at = time.perf_counter()
    work = queue_step(job.model, job.optimizer, job.scheduler, batches, job.layout.device, graphs=job.graphs)
    work.advance_schedule()  # the next step may be queued before this one is read
    return _Queued(step, epoch, work, queued_at)


def _overlaps(job: TrainingJob) -> bool:
    """Whether a step's numbers are read after the next step is queued: on GPUs, where the device then works while
    the host logs and launches. On a CPU every step runs as it is queued; reading at once keeps each step's time its
    own (``tokens_per_s``)."""
    return job.layout.device.type == "cuda"


def _record(job: TrainingJob, queued: _Queued, result: "FitResult", counters: "_Counters") -> None:
    """Read a queued step's numbers (waiting for it), then log and count it; a NaN/inf step ends the job."""
    try:
        out = queued.work.result()
    except NonFiniteStep as err:  # every rank raises it at the same step
        raise FloatingPointError(f"{err} at step {queued.step}; the update was not applied and the last saved "
                                 "checkpoint is intact: lower the learning_rate or check the data") from None
    now = time.perf_counter()
    elapsed = now - max(queued.queued_at, counters.last_read)  # steps overlap: count each moment once
    counters.last_read = now
    result.steps = queued.step
    counters.tokens += out.real_tokens
    counters.seconds += elapsed
    result.final_train_loss = out.loss
    job.metrics.write(event="train", step=queued.step, epoch=queued.epoch, loss=out.loss, lr=out.learning_rate,
                      grad_norm=out.grad_norm, loss_tokens=out.loss_tokens, tokens=out.real_tokens,
                      tokens_per_s=out.real_tokens / max(elapsed, 1e-9), skipped=out.skipped)
    job.progress.update(result.steps, out.loss, counters.tokens / max(counters.seconds, 1e-9))


def _training_batches(job: TrainingJob, items: Sequence, epoch: int, skip: int = 0):
    """This rank's collated micro batches for each optimizer step of ``epoch``: padded examples or packed bins.

    ``skip``: steps of this epoch already trained (a resumed job); the epoch's order is fixed by (seed, epoch).
    """
    hp, layout, plan = job.hyperparameters, job.layout, job.packing
    steps = iterate_micro_batches(
        items, global_batch_size=plan.global_batch_size if plan else hp.batch_size,
        micro_batch_size=plan.micro_batch_size if plan else hp.micro_batch_size,
        dp_rank=layout.data_parallel_rank, dp_size=layout.data_parallel_size, seed=hp.seed, epoch=epoch,
    )
    to_batch = collate_packed if plan else collate
    for index, micro in enumerate(steps):
        if index < skip:
            continue
        yield [to_batch(m, pad_id=job.pad_id, pad_to_multiple_of=job.pad_to_multiple_of) for m in micro]


def _validation_batches(job: TrainingJob):
    hp, layout = job.hyperparameters, job.layout
    for micro in iterate_validation_micro_batches(
        job.val_examples, global_batch_size=hp.batch_size, micro_batch_size=hp.micro_batch_size,
        dp_rank=layout.data_parallel_rank, dp_size=layout.data_parallel_size,
    ):
        yield [collate(m, pad_id=job.pad_id, pad_to_multiple_of=job.pad_to_multiple_of) for m in micro]


def _validate(job: TrainingJob, result: FitResult, stopper: EarlyStopping, epoch: int, step: int,
              counters: "_Counters") -> None:
    """Validation loss, early stopping and the best checkpoint; then the resumable checkpoint of this step."""
    result.last_validated_step = step
    if job.val_examples:
        _score(job, result, stopper, epoch, step)
    if job.save_checkpoint is not None:
        job.save_checkpoint(_position(job, result, stopper, counters))


def _score(job: TrainingJob, result: FitResult, stopper: EarlyStopping, epoch: int, step: int) -> None:
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
    """Train until the planned steps, early stopping or a stop signal; returns what happened."""
    with job.stop:  # SIGTERM/SIGINT only set a flag while it is entered
        return _fit(job)


@dataclass
class _Counters:
    """Totals for tokens/s across the whole job (a resumed job continues them)."""

    tokens: int = 0
    seconds: float = 0.0
    last_read: float = 0.0
    """When the loop last read a step's numbers (``time.perf_counter``; not saved)."""


def _data_order(job: TrainingJob) -> Tuple[int, int]:
    """``(steps per epoch, examples or packed bins per step)``: a resumed job must have the same."""
    hp = job.hyperparameters
    return (_steps_per_epoch(len(job.train_examples), hp, job.packing),
            job.packing.global_batch_size if job.packing else hp.batch_size)


def _position(job: TrainingJob, result: FitResult, stopper: EarlyStopping, counters: _Counters) -> LoopPosition:
    steps_per_epoch, global_batch_size = _data_order(job)
    return LoopPosition(
        steps=result.steps, steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size,
        epochs_completed=result.epochs_completed, last_validated_step=result.last_validated_step,
        best_val_loss=_finite_or_none(result.best_val_loss), best_epoch=result.best_epoch, best_step=result.best_step,
        final_train_loss=_finite_or_none(result.final_train_loss),
        final_val_loss=_finite_or_none(result.final_val_loss), early_stopping_best=_finite_or_none(stopper.best),
        early_stopping_best_at=stopper.best_at, bad_validations=stopper.bad_validations, tokens=counters.tokens,
        seconds=counters.seconds,
    )


def _restore(job: TrainingJob, result: FitResult, stopper: EarlyStopping, counters: _Counters) -> None:
    """Continue from ``job.resume``: same step, early-stopping state and totals as when it was saved."""
    start = job.resume
    steps_per_epoch, global_batch_size = _data_order(job)
    if (start.steps_per_epoch, start.global_batch_size) != (steps_per_epoch, global_batch_size):
        raise ValueError(
            f"the checkpoint to resume was written with {start.steps_per_epoch} steps per epoch of "
            f"{start.global_batch_size} (examples or packed bins); this run has {steps_per_epoch} of "
            f"{global_batch_size}. Resume with the same dataset, batch and packing settings, or start "
            "a new output_dir.")
    result.steps = start.steps
    result.epochs_completed = max(start.epochs_completed, start.steps // start.steps_per_epoch)
    result.last_validated_step = start.last_validated_step
    result.best_val_loss = _or(start.best_val_loss, math.inf)
    result.best_epoch, result.best_step = start.best_epoch, start.best_step
    result.final_train_loss = _or(start.final_train_loss, math.nan)
    result.final_val_loss = _or(start.final_val_loss, math.nan)
    stopper.best, stopper.best_at = _or(start.early_stopping_best, math.inf), start.early_stopping_best_at
    stopper.bad_validations = start.bad_validations
    counters.tokens, counters.seconds = start.tokens, start.seconds
    job.metrics.write(event="resume", step=start.steps)
    job.progress.message(f"resuming after step {start.steps} (epoch {start.steps // start.steps_per_epoch})")


def _fit(job: TrainingJob) -> FitResult:
    hp = job.hyperparameters
    total_steps = planned_steps(len(job.train_examples), hp, job.packing)
    per_epoch = _steps_per_epoch(len(job.train_examples), hp, job.packing)
    # Packed: the shuffled unit is a bin (bins are fixed for the job; their order changes every epoch).
    items = job.packing.take(job.train_examples) if job.packing else job.train_examples
    stopper = EarlyStopping(hp.early_stopping.patience, hp.early_stopping.min_delta, hp.early_stopping.enabled)
    result, counters = FitResult(), _Counters()
    if job.resume is not None:
        _restore(job, result, stopper, counters)
    job.status.running(total_steps=total_steps, steps_completed=result.steps, steps_per_epoch=per_epoch)
    first_epoch, skip = divmod(result.steps, per_epoch)
    epoch = first_epoch
    for epoch in range(first_epoch, hp.epochs):
        if result.steps >= total_steps or stopper.should_stop:
            break
        # On GPUs one step stays queued while the next is launched: its numbers are read after the next step is
        # queued, so the GPU never waits for the host's logging and launching. A step that validation, the epoch's
        # end or the job's end follows is read at once (those must see exactly its weights).
        overlap = _overlaps(job)
        pending: Optional[_Queued] = None
        for batches in _training_batches(job, items, epoch, skip if epoch == first_epoch else 0):
            step = result.steps + (pending is not None) + 1
            if step > total_steps or _stop_requested(job, result):  # also a signal sent while loading
                break
            queued = _queue(job, batches, step, epoch)
            if pending is not None:
                _record(job, pending, result, counters)
            pending = queued
            validate = bool(hp.val_check_interval) and step % hp.val_check_interval == 0
            if not overlap or validate or step % per_epoch == 0 or step == total_steps:
                _record(job, pending, result, counters)
                pending = None
            if validate:
                _validate(job, result, stopper, epoch, result.steps, counters)
                if stopper.should_stop:
                    break
        else:
            # End of a full epoch: validate (unless the interval just did at this very step). Counted first, so
            # the validation's checkpoint records the finished epoch.
            if pending is not None:  # (read already where the epoch has its planned number of steps)
                _record(job, pending, result, counters)
                pending = None
            result.epochs_completed = epoch + 1
            if result.steps > result.last_validated_step:
                _validate(job, result, stopper, epoch, result.steps, counters)
        if pending is not None:  # the loop broke with a step queued (a stop signal)
            _record(job, pending, result, counters)
            pending = None
        if stopper.should_stop:
            result.stopped_early = True
            job.progress.message(f"early stopping: no val_loss improvement > {stopper.min_delta} in "
                                 f"{stopper.patience} validations")
        if stopper.should_stop or result.stopped_by_signal:
            break
    if result.stopped_by_signal:  # the best checkpoint keeps its meaning: no validation of the cut-off epoch
        _stop_for_signal(job, result, _position(job, result, stopper, counters))
    elif result.steps > result.last_validated_step and not result.stopped_early:
        # ended mid-epoch (max_steps): judge the final weights
        _validate(job, result, stopper, epoch, result.steps, counters)
    if not job.val_examples and not result.stopped_by_signal:
        job.save_best()  # no validation data: the final weights are the result
    result.tokens_per_second = counters.tokens / max(counters.seconds, 1e-9)
    result.train_seconds = counters.seconds
    job.progress.close()
    return result


def _stop_for_signal(job: TrainingJob, result: FitResult, position: LoopPosition) -> None:
    """Say why training ends and save a resumable checkpoint when the job has that callback."""
    saving = "saving a checkpoint" if job.save_checkpoint is not None else "no resumable checkpoint configured"
    job.progress.message(f"{result.stop_reason} received: stopping after step {result.steps}; {saving}")
    if job.save_checkpoint is not None:
        job.save_checkpoint(position)


def _finite_or_none(value: float) -> Optional[float]:
    """None for inf/NaN: a checkpoint's common state is compared across ranks, and NaN never equals itself."""
    return value if math.isfinite(value) else None


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else value
