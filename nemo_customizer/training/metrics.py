"""Job metrics: ``metrics.jsonl`` records and a one-line terminal progress bar (main rank only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


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
    """``[#####.....] step 12/82 | loss 0.734 | 160 tok/s | ETA 6m12s`` redrawn in place on a terminal."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None, width: int = 24, every: int = 1,
                 log: bool = True):
        self.total = max(total_steps, 1)
        self.enabled = enabled
        """Draw the bar (main rank, unless turned off)."""
        self.log = log
        """Print ``message`` lines (main rank only)."""
        self.every = max(every, 1)
        """In a log file (not a terminal) print only every N-th step, and the last."""
        self.stream = stream if stream is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._interactive = bool(getattr(stream, "isatty", lambda: False)())

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if not self._interactive and step % self.every and step != self.total:
            return
        done = int(self.width * step / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        line = (f"[{'#' * done}{'.' * (self.width - done)}] step {step}/{self.total} | loss {loss:.4f} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {_duration(eta)}")
        if self._interactive:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A log line that does not fight with the bar."""
        if not self.log:
            return
        if self.enabled and self._interactive:
            self.stream.write("\n")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self._interactive:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
