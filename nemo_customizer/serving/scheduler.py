"""Request batching: one thread owns the model and runs a ``ContinuousBatch``; request handlers hand it jobs.

Each API request becomes a :class:`Job` of rows (one per prompt and choice). Rows wait in a queue until the batch
has a free row, are prefilled alone, then decode with every other live row, one token per step, whatever their
request or adapter. After every step the thread wakes the asyncio handlers whose rows moved, through their event
loop; they read the rows (tokens, text, finish) and answer or stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Deque, List, Optional, Set, Tuple

import torch

from nemo_customizer.inference.continuous import ContinuousBatch
from nemo_customizer.inference.generator import Generator, Row

log = logging.getLogger("nemo_customizer.serving")


class Job:
    """The rows of one request and the event its handler waits on."""

    def __init__(self, rows: List[Row], loop: asyncio.AbstractEventLoop):
        self.rows = rows
        self.error: Optional[BaseException] = None
        self._loop = loop
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.error is not None or all(row.done for row in self.rows)

    def notify(self) -> None:
        """Wake the handler (called from the model's thread)."""
        try:
            self._loop.call_soon_threadsafe(self._changed.set)
        except RuntimeError:  # the handler's loop is closed: nobody is waiting any more
            pass

    async def changed(self) -> None:
        """Wait until the rows moved on since the last call."""
        await self._changed.wait()
        self._changed.clear()

    async def finished(self) -> None:
        while not self.done:
            await self.changed()

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()


class Scheduler:
    """Owns the model's thread: admits queued rows into the batch and steps it while any row is generating."""

    def __init__(self, generator: Generator, max_batch_size: int):
        self.generator = generator
        self.max_batch_size = max_batch_size
        # Held while the model runs (admission + one step). Adapter removal takes it, so no row is mid-step then.
        self.lock = threading.Lock()
        self._wake = threading.Condition()
        self._pending: Deque[Tuple[Row, Job]] = collections.deque()
        self._live: List[Tuple[Row, Job]] = []
        self._batch = ContinuousBatch(generator, max_rows=max_batch_size)
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.peak_rows = 0  # most rows decoded in one step (how much batching happened)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nemo-customizer-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail([job for _, job in list(self._pending) + self._live], RuntimeError("the server is shutting down"))

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.extend((row, job) for row in job.rows)
            self._wake.notify()

    @property
    def pending(self) -> int:
        """Rows waiting for a free row of the batch."""
        return len(self._pending)

    @property
    def decoding(self) -> List[Row]:
        """The rows in the batch now (a snapshot)."""
        return [row for row, _ in list(self._live)]

    def rows_using(self, adapter: str) -> int:
        """Rows, queued or decoding, that use ``adapter`` (call holding ``lock``)."""
        with self._wake:
            queued = [row for row, _ in self._pending]
        return sum(1 for row in queued + [row for row, _ in self._live] if row.adapter == adapter and not row.done)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self._batch.active:
                        self._wake.wait()
                    if self._stopping:
                        return
                with self.lock:
                    touched = self._step()
                for job in touched:
                    job.notify()

    def _step(self) -> Set[Job]:
        """Admit what fits, decode one token for every live row; the jobs whose rows moved."""
        touched: Set[Job] = set()
        try:
            while self._batch.free_slots > 0:
                with self._wake:
                    if not self._pending:
                        break
                    row, job = self._pending.popleft()
                if row.done:  # cancelled while queued
                    touched.add(job)
                    continue
                if row.adapter is not None and row.adapter not in self.generator.lora.adapters:
                    # unloaded while the request waited: never decode it with the base weights instead
                    self._fail([job], RuntimeError(f"adapter {row.adapter!r} was unloaded"))
                    continue
                self._batch.add(row)
                self._live.append((row, job))
                touched.add(job)
            if self._batch.active:
                self._batch.step()
                self.steps += 1
                self.peak_rows = max(self.peak_rows, len(self._batch.rows))
        except Exception as exc:  # a bug or an out-of-memory: fail the requests in flight, keep serving others
            log.exception("generation failed")
            self._fail([job for _, job in self._live], exc)
            self._live = []
            self._batch = ContinuousBatch(self.generator, max_rows=self.max_batch_size)
            return touched
        touched.update(job for _, job in self._live)
        self._live = [(row, job) for row, job in self._live if not row.done]
        return touched

    @staticmethod
    def _fail(jobs, error: BaseException) -> None:
        for job in set(jobs):
            job.error = error
            job.cancel()
            job.notify()
