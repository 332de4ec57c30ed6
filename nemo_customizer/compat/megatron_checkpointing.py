"""megatron-core 0.16.x's checkpoint writer, adapted to synchronous saves from any script."""

from __future__ import annotations

import queue

from megatron.core.dist_checkpointing.strategies import filesystem_async


def use_in_process_checkpoint_results_queue() -> None:
    """Give mcore's checkpoint writer a plain in-process queue for its write results.

    megatron-core 0.16.x's ``dist_checkpointing/strategies/filesystem_async.py`` creates that queue lazily in the
    private ``_results_queue``, from a ``spawn`` multiprocessing Manager, which starts a fresh interpreter that
    re-imports the caller's ``__main__``: a user script without an ``if __name__ == "__main__":`` guard would run
    itself again and the save fails (EOFError). The queue only has to cross processes for asynchronous saves;
    ours are synchronous, so the write results are put and read in this process. Left in place for the process's
    life (mcore would keep its Manager queue too).
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
