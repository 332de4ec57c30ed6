"""The training progress bar: one line redrawn in place on a terminal; one line every ``log_interval`` steps (and at
the last) in a log file or CI."""

from __future__ import annotations

import io
import os
from types import SimpleNamespace

import pytest

from nemo_customizer.training import metrics
from nemo_customizer.training.metrics import ProgressBar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_in_place():
    stream = FakeTerminal()
    bar = ProgressBar(8, stream=stream, every=4)
    bar.message("training 8 steps")
    for step in range(1, 9):
        bar.update(step, loss=1.0 / step, tokens_per_s=1234.0)
        if step == 4:
            bar.message("validation  epoch 1 step 4: val_loss 0.2000")
    bar.close()
    text = stream.getvalue()
    lines = text.split("\n")
    # the messages on lines of their own, the bar redrawn with carriage returns, ending on the last step
    assert lines[0] == "training 8 steps"
    assert any(line.endswith("validation  epoch 1 step 4: val_loss 0.2000") for line in lines)
    assert text.count("\r") > 2
    assert text.endswith("\n") and "step 8/8" in lines[-2].split("\r")[-1]
    assert "loss 0.1250, 1,234 tok/s" in lines[-2].split("\r")[-1]
    assert sum(line.count("step 8/8") for line in lines) == 1  # one final line, not one line per step


def _drain(fd: int) -> str:
    """Everything written to the pseudo-terminal so far: one read returns only what one write delivered."""
    import select

    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        chunks.append(os.read(fd, 1 << 16))
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_that_reports_no_size_still_shows_the_bar():
    """A pseudo-terminal nobody sized (``script``, some containers) reports 0 x 0; tqdm alone would hide the bar."""
    controller, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as stream:
            assert os.get_terminal_size(terminal) == (0, 0)
            bar = ProgressBar(2, stream=stream)
            bar.update(1, loss=0.5, tokens_per_s=10.0)
            bar.update(2, loss=0.25, tokens_per_s=10.0)
            bar.close()
        shown = _drain(controller)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "step 2/2" in shown and "loss 0.2500" in shown


def test_a_log_file_gets_a_line_every_log_interval_steps_and_at_the_last():
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, every=4)
    bar.message("training 10 steps")
    for step in range(1, 11):
        bar.update(step, loss=1.0 / step, tokens_per_s=1234.0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "training 10 steps"
    assert [line.split(" (")[0] for line in lines[1:]] == ["step 4/10", "step 8/10", "step 10/10"]
    assert lines[-1].startswith("step 10/10 (100%) [") and lines[-1].endswith(", loss 0.1000, 1,234 tok/s]")


def test_a_resumed_job_estimates_the_time_left_from_the_steps_it_ran(monkeypatch):
    """Resumed after step 6, a job at step 7 has run one step: 10 s per step leaves 30 s for the last three."""
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream)
    bar.update(7, loss=0.5, tokens_per_s=100.0)
    assert stream.getvalue().startswith("step 7/10 (70%) [00:10<00:30, loss 0.5000, 100 tok/s]")


def test_turned_off_it_draws_nothing_and_other_ranks_print_no_messages():
    stream = FakeTerminal()
    quiet = ProgressBar(4, enabled=False, stream=stream)
    quiet.update(1, loss=1.0, tokens_per_s=1.0)
    quiet.message("kept")
    quiet.close()
    other_rank = ProgressBar(4, enabled=False, stream=stream, log=False)
    other_rank.update(1, loss=1.0, tokens_per_s=1.0)
    other_rank.message("dropped")
    other_rank.close()
    assert stream.getvalue() == "kept\n"
