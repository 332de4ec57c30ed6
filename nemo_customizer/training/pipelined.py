"""Training steps run with the next step queued before the last one is read.

Reading a step's numbers (loss, token counts, gradient norm) makes the host wait for the device. On GPUs a step is
read only once the next one is queued, so the GPU works while the host logs, collates and launches; a step that
must be read at once (validation, an epoch's end or the job's end follows it: those must see exactly its weights)
is read before anything else is queued. On a CPU every step runs as it is queued and is read at once, which keeps
each step's time its own (the ``tokens_per_s`` of its metrics record).

The training loop and ``scripts/benchmark.py`` both step through ``PipelinedSteps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch

from nemo_customizer.training.step import NonFiniteStep, QueuedStep, StepResult


class PlannedStep(NamedTuple):
    """A step to run: its number in the job, this rank's micro batches, and whether it is read before the next is
    queued."""

    number: int
    batches: object
    read_at_once: bool = False


@dataclass(frozen=True)
class ReadStep:
    """A step whose numbers were read."""

    number: int
    result: StepResult
    seconds: float
    """From the later of its queueing and the previous read, to its read: steps overlap, each moment counts once."""


def overlaps(device: torch.device) -> bool:
    """Whether a step is read after the next is queued on ``device`` (GPUs: yes; a CPU: no)."""
    return device.type == "cuda"


@dataclass
class _Queued:
    number: int
    work: QueuedStep
    queued_at: float


class PipelinedSteps:
    """Queues each planned step with ``queue(batches)`` (``training.step.queue_step``) and yields it once read.

    Stop consuming (``break``) only after a step planned ``read_at_once``: a step still queued then is never read.
    """

    def __init__(self, queue: Callable[[object], QueuedStep], device: torch.device):
        self.queue = queue
        self.overlap = overlaps(device)
        self._last_read = 0.0  # time.perf_counter() of the latest read, across calls

    def __call__(self, planned: Iterable[PlannedStep]) -> Iterator[ReadStep]:
        pending: Optional[_Queued] = None
        for step in planned:
            queued_at = time.perf_counter()
            queued = _Queued(step.number, self.queue(step.batches), queued_at)
            queued.work.advance_schedule()  # the next step may be queued before this one is read
            if pending is not None:
                yield self._read(pending)
            pending = queued
            if step.read_at_once or not self.overlap:
                pending = None
                yield self._read(queued)
        if pending is not None:  # the plan ended (or was stopped) with a step queued
            yield self._read(pending)

    def _read(self, queued: _Queued) -> ReadStep:
        try:
            result = queued.work.result()
        except NonFiniteStep as err:  # every rank raises it at the same step
            raise FloatingPointError(f"{err} at step {queued.number}; the update was not applied and the last saved "
                                     "checkpoint is intact: lower the learning_rate or check the data") from None
        now = time.perf_counter()
        seconds = now - max(queued.queued_at, self._last_read)
        self._last_read = now
        return ReadStep(queued.number, result, seconds)
