"""Run a function in N CPU processes over gloo, as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""

from __future__ import annotations

import os

import torch.multiprocessing as mp

from nemo_customizer.distributed.parallel import free_port


def _entry(rank: int, world_size: int, port: int, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    fn(rank, *args)


def run_world(fn, world_size: int, *args) -> None:
    """``fn(rank, *args)`` in ``world_size`` spawned processes; raises if any process fails."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def die_in_checkpoint_save(saves: int) -> None:
    """SIGKILL this process right after its ``saves``-th checkpoint save has written, as a pre-emption would in the
    middle of a job (the next save never starts)."""
    import signal

    from megatron.core import dist_checkpointing

    real_save, calls = dist_checkpointing.save, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == saves:
            os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
