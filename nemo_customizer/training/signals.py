"""SIGTERM, SIGINT or a cancel request as a request to stop cleanly: the loop finishes its step, saves, and the job
ends ``cancelled``.

Schedulers (Slurm preemption, Kubernetes) send SIGTERM and wait a grace period before SIGKILL; Ctrl-C sends SIGINT.
Either one only sets a flag here; the training loop agrees on it over all ranks after every step (ranks may get the
signal at different moments), so every rank stops after the same step. A second signal stops at once
(``KeyboardInterrupt``, nothing saved).

A grace period can be too short: torchrun kills its workers 30 s after passing SIGTERM on, and a full fine-tune's
checkpoint (weights, fp32 masters and Adam moments) can take longer to write. A cancel
request has no deadline: ``python -m nemo_customizer cancel JOB_DIR`` writes the file ``CANCEL`` into the job
directory, and the job stops at its next step boundary as for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CANCEL_FILE = "CANCEL"
"""Written into a job directory to ask the running job to stop (``request_cancel``)."""


def request_cancel(job_dir: Path) -> Path:
    """Ask the job running in ``job_dir`` to stop after its current step, save a checkpoint and end ``cancelled``."""
    path = Path(job_dir) / CANCEL_FILE
    path.write_text(f"cancel requested by process {os.getpid()}\n")
    return path


class StopSignals:
    """While entered, SIGTERM/SIGINT set ``received`` instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere (a job started from a worker thread) the block
    changes nothing and signals keep their usual effect. Re-entrant: nested ``with`` blocks share one installation
    and the previous handlers are restored when the outermost block exits.
    """

    def __init__(self, request_file: Optional[Path] = None) -> None:
        self.received: Optional[int] = None
        """The first stop signal's number, or None."""
        self.request_file = request_file
        """A cancel request is this file existing (``request_cancel``); None: this process does not look for one."""
        self._depth = 0
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        self._depth += 1
        if self._depth == 1 and self.request_file is not None:
            # Running the job again means continuing it: a request left by an earlier run is spent.
            self.request_file.unlink(missing_ok=True)
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def cancel_requested(self) -> bool:
        return self.request_file is not None and self.request_file.exists()

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        if self._depth == 0:
            for number, handler in self._previous.items():
                # None: the previous handler was not installed from Python; the default is the closest.
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)
            self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        # No printing here: the handler may run in the middle of a progress-bar write to the same stream.
        if self.received is not None:
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(number).name}): stopping now")
        self.received = number
