"""The training loop: epochs of optimizer steps, validation, early stopping, best-checkpoint callback, metrics,
a clean stop on SIGTERM/SIGINT, and a stop (before the update) on a NaN/inf loss or gradient.

What the loop knows is one ``LoopState``: resumable checkpoints save it whole, and the job's result and status.json
are derived from it. Steps run through ``PipelinedSteps`` (on GPUs the next step is queued before a step is read).
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

from nemo_customizer.config.schema import HyperparametersConfig
from nemo_customizer.data import iterate_micro_batches, iterate_validation_micro_batches, steps_per_epoch
from nemo_customizer.data.packing import PackingPlan
from nemo_customizer.distributed.collectives import all_reduce_sum
from nemo_customizer.distributed.parallel import ParallelLayout
from nemo_customizer.training.early_stopping import EarlyStopping
from nemo_customizer.training.metrics import MetricsLog, ProgressBar
from nemo_customizer.training.objective import TOKEN_MEAN, Objective
from nemo_customizer.training.pipelined import PipelinedSteps, PlannedStep, ReadStep
from nemo_customizer.training.signals import StopSignals
from nemo_customizer.training.state import LoopState
from nemo_customizer.training.status import JobStatus
from nemo_customizer.training.step import queue_step, validation_totals


@dataclass
class TrainingJob:
    """Everything the loop needs, built by ``api.run``."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    train_examples: Sequence
    """What ``objective`` trains on: ``TokenizedExample``s, or ``preference.ScoredPair``s."""
    val_examples: Sequence
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
    """Takes the state's fields before each metrics record (the records feed its series)."""
    stop: StopSignals = field(default_factory=StopSignals)
    """Entered for the loop (``api.run`` enters it earlier, so a signal during model loading counts too)."""
    save_checkpoint: Optional[Callable[[LoopState], None]] = None
    """Writes a resumable checkpoint (on every rank: collective) after each validation and when a stop signal ends
    training."""
    resume: Optional[LoopState] = None
    """The state a restored checkpoint saved: the loop continues from there (the weights are already loaded)."""
    graphs: Optional[object] = None
    """A ``training.graphs.GraphedForwardBackward`` of ``model``: packed training micro batches replay CUDA graphs."""
    objective: Objective = TOKEN_MEAN
    """The loss and its batches: the token mean (SFT) or ``training.preference.PreferenceLoss`` (DPO)."""


def planned_steps(n_train: int, hp: HyperparametersConfig, packing: Optional[PackingPlan] = None) -> int:
    """Optimizer steps the schedule is built for: epochs × steps per epoch, capped by ``max_steps``."""
    total = hp.epochs * _steps_per_epoch(n_train, hp, packing)
    return min(total, hp.max_steps) if hp.max_steps is not None else total


def _steps_per_epoch(n_train: int, hp: HyperparametersConfig, packing: Optional[PackingPlan]) -> int:
    return packing.steps_per_epoch if packing is not None else steps_per_epoch(n_train, hp.batch_size)


def fit(job: TrainingJob) -> LoopState:
    """Train until the planned steps, early stopping or a stop signal; returns the final state."""
    with job.stop:  # SIGTERM/SIGINT only set a flag while it is entered
        return _fit(job)


def _fit(job: TrainingJob) -> LoopState:
    hp = job.hyperparameters
    total = planned_steps(len(job.train_examples), hp, job.packing)
    state = _starting_state(job)
    job.status.update(state.status_fields())
    job.status.running(total_steps=total, steps_completed=state.steps, steps_per_epoch=state.steps_per_epoch)
    # Packed: the shuffled unit is a bin (bins are fixed for the job; their order changes every epoch).
    items = job.packing.take(job.train_examples) if job.packing else job.train_examples
    # On GPUs each step is read once the next is queued, except where ``_planned_steps`` says to read it at once.
    steps = PipelinedSteps(lambda batches: queue_step(job.model, job.optimizer, job.scheduler, batches,
                                                      job.layout.device, graphs=job.graphs, objective=job.objective),
                           job.layout.device)
    for epoch in range(state.epochs_completed, hp.epochs):
        if state.steps >= total or state.early_stopping.should_stop or state.stop_signal is not None:
            break
        for read in steps(_planned_steps(job, state, items, epoch, total)):
            _record(job, state, read)
            if _validation_due(hp, read.number):
                _validate(job, state)
                if state.early_stopping.should_stop:
                    break
        if state.steps == (epoch + 1) * state.steps_per_epoch and state.steps > state.last_validated_step:
            _validate(job, state)  # a full epoch ended (and the interval did not just validate this step)
        if state.early_stopping.should_stop:
            state.stopped_early = True
            job.progress.message(f"early stopping: no val_loss improvement > {state.early_stopping.min_delta} in "
                                 f"{state.early_stopping.patience} validations")
    if state.stop_signal is not None:  # the best checkpoint keeps its meaning: no validation of the cut-off epoch
        _stop_for_signal(job, state)
    elif state.steps > state.last_validated_step and not state.stopped_early:
        _validate(job, state)  # ended mid-epoch (max_steps): judge the final weights
    if not job.val_examples and state.stop_signal is None:
        job.save_best()  # no validation data: the final weights are the result
    job.progress.close()
    return state


def _starting_state(job: TrainingJob) -> LoopState:
    """A fresh state, or the one a restored checkpoint saved (``job.resume``) when its data order is this run's."""
    steps_per_epoch, global_batch_size = _data_order(job)
    if job.resume is None:
        rule = job.hyperparameters.early_stopping
        return LoopState(steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size,
                         early_stopping=EarlyStopping(rule.patience, rule.min_delta, rule.enabled))
    saved = job.resume
    if (saved.steps_per_epoch, saved.global_batch_size) != (steps_per_epoch, global_batch_size):
        raise ValueError(
            f"the checkpoint to resume was written with {saved.steps_per_epoch} steps per epoch of "
            f"{saved.global_batch_size} (examples or packed bins); this run has {steps_per_epoch} of "
            f"{global_batch_size}. Resume with the same dataset, batch and packing settings, or start "
            "a new output_dir.")
    rule = job.hyperparameters.early_stopping  # the rule is this run's config (equal to the saved run's)
    saved = dataclasses.replace(saved, early_stopping=dataclasses.replace(
        saved.early_stopping, patience=rule.patience, min_delta=rule.min_delta, enabled=rule.enabled))
    job.metrics.write(event="resume", step=saved.steps)
    job.progress.message(f"resuming after step {saved.steps} (epoch {saved.epochs_completed})")
    return dataclasses.replace(saved, stop_signal=None, stop_reason="")  # the saved run's stop is not this run's


def _data_order(job: TrainingJob) -> Tuple[int, int]:
    """``(steps per epoch, examples or packed bins per step)``: a resumed job must have the same."""
    hp = job.hyperparameters
    return (_steps_per_epoch(len(job.train_examples), hp, job.packing),
            job.packing.global_batch_size if job.packing else hp.batch_size)


def _validation_due(hp: HyperparametersConfig, step: int) -> bool:
    return bool(hp.val_check_interval) and step % hp.val_check_interval == 0


def _planned_steps(job: TrainingJob, state: LoopState, items: Sequence, epoch: int, total: int
                   ) -> Iterator[PlannedStep]:
    """The rest of ``epoch``'s steps, until the planned total or a stop request (asked before each step). A step
    that validation, the epoch's end or the job's end follows is read at once: those must see exactly its weights."""
    per_epoch = state.steps_per_epoch
    done = state.steps - epoch * per_epoch  # steps of this epoch already trained (a resumed job)
    for number, batches in enumerate(_training_batches(job, items, epoch, done), start=state.steps + 1):
        if number > total or _stop_requested(job, state):  # also a signal sent while loading
            return
        yield PlannedStep(number, batches, read_at_once=_validation_due(job.hyperparameters, number)
                          or number % per_epoch == 0 or number == total)


def _record(job: TrainingJob, state: LoopState, read: ReadStep) -> None:
    """Count a read step, log it and show it."""
    out = read.result
    state.add_step(read.number, out.loss, out.real_tokens, read.seconds)
    _log(job, state, event="train", step=read.number, epoch=state.epoch, loss=out.loss, lr=out.learning_rate,
         grad_norm=out.grad_norm, **{job.objective.count_name: out.loss_tokens}, tokens=out.real_tokens,
         tokens_per_s=out.real_tokens / max(read.seconds, 1e-9), skipped=out.skipped,
         **job.objective.metrics(out.report, out.loss_tokens))
    job.progress.update(state.steps, out.loss, state.tokens_per_second)


def _validate(job: TrainingJob, state: LoopState) -> None:
    """Validation loss (and the objective's validation metrics: SFT's ``val_mean_token_accuracy``), early stopping
    and the best checkpoint; then the resumable checkpoint of this step."""
    state.last_validated_step = state.steps
    if job.val_examples:
        objective = job.objective.validation  # SFT: also the token accuracy
        loss_sum, count, *report = validation_totals(job.model, _validation_batches(job), job.layout.device,
                                                     objective)
        val = loss_sum / count if count else float("nan")
        metrics = objective.metrics(report, count, prefix="val_")
        improved = state.add_validation(val)
        if improved:
            job.save_best()
        _log(job, state, event="validation", step=state.steps, epoch=state.epoch, val_loss=val, best=improved,
             **metrics)
        job.progress.message(f"validation  epoch {state.epoch} step {state.steps}: val_loss {val:.4f}"
                             + "".join(f", {name} {value:.4f}" for name, value in metrics.items())
                             + ("  (best, saved)" if improved else f"  (best {state.best_val_loss:.4f})"))
    if job.save_checkpoint is not None:
        job.save_checkpoint(state)


def _log(job: TrainingJob, state: LoopState, **record) -> None:
    """A metrics.jsonl record; status.json (which the records feed) first takes the state's fields."""
    job.status.update(state.status_fields())
    job.metrics.write(**record)


def _stop_requested(job: TrainingJob, state: LoopState) -> bool:
    """Whether any rank got a stop signal or a cancel request (recorded in ``state``; SIGTERM wins over SIGINT, a
    request counts as SIGTERM); one all-reduce, so every rank stops before the same step."""
    received = job.stop.received
    term, interrupt, request = all_reduce_sum([float(received == signal.SIGTERM), float(received == signal.SIGINT),
                                               float(job.stop.cancel_requested())])
    state.stop_signal = signal.SIGTERM if term or request else signal.SIGINT if interrupt else None
    state.stop_reason = ("SIGTERM" if term else "SIGINT" if interrupt else "cancel request" if request else "")
    return state.stop_signal is not None


def _stop_for_signal(job: TrainingJob, state: LoopState) -> None:
    """Say why training ends and save a resumable checkpoint when the job has that callback."""
    saving = "saving a checkpoint" if job.save_checkpoint is not None else "no resumable checkpoint configured"
    job.progress.message(f"{state.stop_reason} received: stopping after step {state.steps}; {saving}")
    if job.save_checkpoint is not None:
        job.save_checkpoint(state)


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
    to_batch = job.objective.collate_packed if plan else job.objective.collate
    for index, micro in enumerate(steps):
        if index < skip:
            continue
        yield [to_batch(m, pad_id=job.pad_id, pad_to_multiple_of=job.pad_to_multiple_of) for m in micro]


def _validation_batches(job: TrainingJob):
    hp, layout = job.hyperparameters, job.layout
    for micro in iterate_validation_micro_batches(
        job.val_examples, global_batch_size=hp.batch_size, micro_batch_size=hp.micro_batch_size,
        dp_rank=layout.data_parallel_rank, dp_size=layout.data_parallel_size, padding=job.objective.padding,
    ):
        yield [job.objective.collate(m, pad_id=job.pad_id, pad_to_multiple_of=job.pad_to_multiple_of) for m in micro]
