"""Job metrics: ``metrics.jsonl`` records and the steps' progress bar (main rank only)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` (flushed each line, so a crash loses nothing).

    ``listeners`` (main rank: the job status, plots) get every record too, after it is written.
    """

    def __init__(self, path: Optional[Path], listeners: Sequence[Callable[[dict], None]] = ()):
        self.path = path
        self._file = open(path, "a", encoding="utf-8") if path is not None else None
        self.listeners = tuple(listeners)

    def write(self, **record) -> None:
        if self._file is None and not self.listeners:
            return
        record.setdefault("time", round(time.time(), 3))
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for listener in self.listeners:
            listener(record)

    def rewind(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a job resumed from that step's checkpoint trains them again)."""
        if self._file is None:
            return
        self._file.close()
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                if json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.rewind")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ProgressBar:
    """The training steps' progress (main rank), drawn by ``tqdm``.

    On a terminal, one line redrawn in place: ``41%|████▏     | step 34/82 [00:12<00:17, loss 0.7340, 160 tok/s]``.
    Elsewhere (a log file, CI), one line per ``every`` steps and at the last step:
    ``step 34/82 (41%) [00:12<00:17, loss 0.7340, 160 tok/s]``.
    """

    TERMINAL_FORMAT = "{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
    LOG_FORMAT = "step {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}{postfix}]"

    def __init__(self, total_steps: int, enabled: bool = True, stream=None, every: int = 1, log: bool = True):
        self.total = max(total_steps, 1)
        self.enabled = enabled
        """Show the progress (main rank, unless turned off)."""
        self.log = log
        """Print ``message`` lines (main rank only)."""
        self.every = max(every, 1)
        """In a log file (not a terminal) print only every N-th step, and the last."""
        self.stream = stream if stream is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.interactive = _is_terminal(self.stream)
        """A terminal: redraw one line in place."""
        self._start = time.perf_counter()
        self._initial: Optional[int] = None  # steps done before this process's first (a resumed job)
        self._bar = None  # the terminal's tqdm bar, from the first step on

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self._initial is None:
            self._initial = step - 1
        postfix = f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s"
        if self.interactive:
            if self._bar is None:
                self._bar = tqdm(total=self.total, initial=self._initial, file=self.stream,
                                 bar_format=self.TERMINAL_FORMAT, **_terminal_size(self.stream))
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(step - self._bar.n)  # redraws at most every 0.1 s (tqdm's mininterval)
            return
        if step % self.every and step != self.total:
            return
        line = tqdm.format_meter(step, self.total, time.perf_counter() - self._start, initial=self._initial,
                                 postfix=postfix, bar_format=self.LOG_FORMAT)
        self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A log line that does not fight with the bar."""
        if not self.log:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)  # clears the bar, prints, redraws it below
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Leave the terminal's bar as its last state (a finished job: full) and move to the next line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _terminal_size(stream) -> dict:
    """tqdm's size arguments: the width measured at each redraw, unless the terminal reports no size (a
    pseudo-terminal nobody sized: ``script``, some containers), where tqdm would hide the bar; then 80 x 24."""
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor: tqdm measures nothing either
        return {"dynamic_ncols": True}
    return {"dynamic_ncols": True} if columns and lines else {"ncols": 80, "nrows": 24}


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False
