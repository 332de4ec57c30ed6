"""SIGTERM and SIGINT as a request to stop cleanly: the loop finishes its step, saves, and the job ends ``cancelled``.

Schedulers (Slurm preemption, Kubernetes) send SIGTERM and wait a grace period before SIGKILL; Ctrl-C sends SIGINT.
Either one only sets a flag here; the training loop agrees on it over all ranks after every step (ranks may get the
signal at different moments), so every rank stops after the same step. A second signal stops at once
(``KeyboardInterrupt``, nothing saved).
"""

from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM/SIGINT set ``received`` instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere (a job started from a worker thread) the block
    changes nothing and signals keep their usual effect. Re-entrant: nested ``with`` blocks share one installation
    and the previous handlers are restored when the outermost block exits.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        """The first stop signal's number, or None."""
        self._depth = 0
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

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
