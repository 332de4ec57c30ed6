"""``PipelinedSteps``: which steps are read at once and which after the next is queued, and how each step's time
is counted. A fake step stands in for ``training.step.QueuedStep`` (queue, advance the schedule, read)."""

import pytest
import torch

from nemo_customizer.training import pipelined
from nemo_customizer.training.pipelined import PipelinedSteps, PlannedStep
from nemo_customizer.training.step import NonFiniteStep


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeStep:
    """Queued when made; ``result()`` takes ``read_seconds`` of the clock (the host waits for the device)."""

    def __init__(self, number: int, events: list, clock: _Clock, read_seconds: float = 2.0, finite: bool = True):
        self.number, self.events, self.clock = number, events, clock
        self.read_seconds, self.finite = read_seconds, finite
        events.append(("queue", number))

    def advance_schedule(self) -> None:
        self.events.append(("schedule", self.number))

    def result(self):
        self.clock.now += self.read_seconds
        self.events.append(("read", self.number))
        if not self.finite:
            raise NonFiniteStep("training loss is nan")
        return f"numbers of {self.number}"


def _run(device: str, plan, monkeypatch, *, consumer_seconds=None, not_finite=()):
    clock, events = _Clock(), []
    monkeypatch.setattr(pipelined.time, "perf_counter", clock)

    def queue(number):
        clock.now += 1.0  # launching a step takes the host a while
        return _FakeStep(number, events, clock, finite=number not in not_finite)

    steps = PipelinedSteps(queue, torch.device(device))
    reads = []
    for read in steps(plan):
        assert read.result == f"numbers of {read.number}"
        events.append(("use", read.number))
        reads.append(read)
        clock.now += (consumer_seconds or {}).get(read.number, 0.0)  # e.g. a validation after this step
    return events, reads, clock


def _plan(read_at_once=()):
    return [PlannedStep(n, n, read_at_once=n in read_at_once) for n in range(1, 6)]


def test_on_a_gpu_a_step_is_read_after_the_next_is_queued_unless_it_must_be_read_at_once(monkeypatch):
    events, _, _ = _run("cuda", _plan(read_at_once={3}), monkeypatch)
    assert [e for e in events if e[0] != "schedule"] == [
        ("queue", 1), ("queue", 2), ("read", 1), ("use", 1), ("queue", 3), ("read", 2), ("use", 2),
        ("read", 3), ("use", 3),  # read at once: nothing else is queued before its user is done with it
        ("queue", 4), ("queue", 5), ("read", 4), ("use", 4), ("read", 5), ("use", 5)]  # 5: the plan's end
    # the schedule steps as each step is queued, so that the next one is queued with its learning rate
    assert all(events.index(("schedule", n)) == events.index(("queue", n)) + 1 for n in range(1, 6))


def test_on_a_cpu_every_step_is_read_at_once(monkeypatch):
    events, _, _ = _run("cpu", _plan(), monkeypatch)
    assert [e for e in events if e[0] != "schedule"] == [
        e for n in range(1, 6) for e in (("queue", n), ("read", n), ("use", n))]


def test_a_plan_that_stops_early_still_reads_its_last_queued_step(monkeypatch):
    def stopped_after_two():
        yield from _plan()[:2]

    events, reads, _ = _run("cuda", stopped_after_two(), monkeypatch)
    assert [r.number for r in reads] == [1, 2] and events[-2:] == [("read", 2), ("use", 2)]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_each_moment_counts_once_and_time_between_steps_is_not_a_steps(device, monkeypatch):
    """Steps overlap on a GPU: a step's time runs from the later of its queueing and the previous read to its read.
    What the user of step 3 does (a validation) before step 4 is queued counts for no step."""
    events, reads, clock = _run(device, _plan(read_at_once={3}), monkeypatch, consumer_seconds={3: 10.0})
    assert sum(r.seconds for r in reads) == pytest.approx(clock.now - 10.0)
    if device == "cuda":  # queue 1 (1s), queue 2 (1s), read 1 (2s); queue 3, read 2; read 3; ...
        assert [r.seconds for r in reads] == pytest.approx([4.0, 3.0, 2.0, 4.0, 2.0])
    else:
        assert [r.seconds for r in reads] == pytest.approx([3.0] * 5)


def test_a_non_finite_step_fails_naming_its_step(monkeypatch):
    with pytest.raises(FloatingPointError, match="training loss is nan at step 3; the update was not applied"):
        _run("cuda", _plan(), monkeypatch, not_finite={3})
