"""Run one job in N local worker processes from a single Python call, as ``torchrun --nproc-per-node N`` would.

``customize(..., num_gpus=N)`` uses this so a notebook or a research script can use every GPU of its machine
without a launcher. Each worker gets torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and runs the same function; rank 0's return value comes back.
Workers are started with ``spawn`` (a fresh interpreter: CUDA cannot be forked), so the function and its arguments
must be picklable.
"""

from __future__ import annotations

import os
import queue
import signal
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from nemo_customizer.distributed.parallel import free_port


class WorkerFailed(RuntimeError):
    """A worker raised an exception that could not be sent back as itself; the message holds its traceback."""


def run_local_workers(fn: Callable[..., Any], num_workers: int, *args: Any) -> Any:
    """``fn(*args)`` in ``num_workers`` processes of one local job; returns rank 0's result.

    The first worker exception is re-raised here (its own type when it pickles, else ``WorkerFailed``).
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, num_workers, port, results, fn, args))
               for rank in range(num_workers)]
    for worker in workers:
        worker.start()
    outcomes: dict = {}
    interrupted = False
    try:
        while len(outcomes) < num_workers:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: stop now
                    raise
                # The workers stop cleanly on SIGINT (finish the step, checkpoint, report JobCancelled); a terminal's
                # Ctrl-C reaches them already, a `kill -INT` of this process does not.
                interrupted = True
                for worker in workers:
                    if worker.is_alive():
                        os.kill(worker.pid, signal.SIGINT)
                continue
            except queue.Empty:
                dead = [w.exitcode for r, w in enumerate(workers) if r not in outcomes and w.exitcode]
                if dead:  # killed (by a signal, the OOM killer) before it could report
                    outcomes[-1] = (False, WorkerFailed(f"a worker process died with exit status {dead[0]}"))
                    break
                continue
            outcomes[rank] = (ok, value)
            if not ok:  # the others may wait forever in a collective: stop them
                break
    finally:
        failed = len(outcomes) < num_workers or any(not ok for ok, _ in outcomes.values())
        for worker in workers:
            if failed and worker.is_alive():
                worker.terminate()
            worker.join()
    for rank in sorted(outcomes):
        ok, value = outcomes[rank]
        if not ok:
            raise value
    return outcomes[0][1]


def _worker(rank: int, world: int, port: int, results, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        value = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        results.put((rank, False, _picklable(exc)))
        return
    results.put((rank, True, value if rank == 0 else None))


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return WorkerFailed("".join(traceback.format_exception(exc)))
