"""Which examples go into which micro batch, on which data-parallel rank, at which step. Pure and seeded.

A global batch (``global_batch_size`` examples, one optimizer step) is cut into ``dp_size`` contiguous shares, one per
data-parallel rank, and each share into micro batches of ``micro_batch_size`` (the rest is gradient accumulation):
``global_batch_size == micro_batch_size * dp_size * num_micro_batches``. Ranks and epochs are plain arguments, so the
same code serves 1 and N processes and any rank's batches can be computed (and tested) anywhere.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence, TypeVar

import numpy as np

from nemo_customizer.data.examples import PADDING_EXAMPLE

T = TypeVar("T")
MicroBatches = list[list[T]]
"""One rank's micro batches for one optimizer step."""


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    """Optimizer steps in one training epoch. The last incomplete global batch is dropped, so this rounds down."""
    return n_examples // global_batch_size


def validation_steps(n_examples: int, global_batch_size: int) -> int:
    """Global batches in one validation pass. Validation uses every example, so this rounds up."""
    return math.ceil(n_examples / global_batch_size)


def num_micro_batches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Micro batches per rank per step (gradient accumulation steps); raises unless the sizes divide evenly."""
    if min(global_batch_size, micro_batch_size, dp_size) < 1:
        raise ValueError(f"batch sizes and dp_size must be >= 1, got global_batch_size={global_batch_size}, "
                         f"micro_batch_size={micro_batch_size}, dp_size={dp_size}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size "
                         f"({micro_batch_size}) x data-parallel size ({dp_size})")
    return global_batch_size // (micro_batch_size * dp_size)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch``: the same on every rank, different each epoch."""
    # Seeding with the pair (not seed + epoch) keeps (seed=1, epoch=1) and (seed=2, epoch=0) distinct.
    return np.random.default_rng((seed, epoch)).permutation(n_examples).tolist()


def iterate_micro_batches(
    examples: Sequence[T],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
) -> Iterator[MicroBatches[T]]:
    """Training: yield, for each optimizer step of ``epoch``, rank ``dp_rank``'s micro batches.

    Global batch ``k`` is examples ``[k*G, (k+1)*G)`` of ``epoch_order``; rank ``r`` takes its ``r``-th contiguous
    ``G / dp_size`` share, cut into micro batches in order. The last incomplete global batch is dropped (every step
    then has the same size, and the dropped examples are different ones each epoch). ``start_step`` skips the first
    steps, for resuming mid-epoch.
    """
    num_micro_batches(global_batch_size, micro_batch_size, dp_size)  # validates the sizes
    _check_rank(dp_rank, dp_size)
    order = epoch_order(len(examples), seed, epoch)
    for step in range(start_step, steps_per_epoch(len(examples), global_batch_size)):
        indices = order[step * global_batch_size:(step + 1) * global_batch_size]
        yield _rank_share([examples[i] for i in indices], micro_batch_size, dp_rank, dp_size)


def iterate_validation_micro_batches(
    examples: Sequence[T],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    padding: object = PADDING_EXAMPLE,
) -> Iterator[MicroBatches[T]]:
    """Validation: yield, for each global batch, rank ``dp_rank``'s micro batches; every example is used once.

    Examples keep their order (no shuffle). The last global batch may be short: it is padded with ``padding``
    items (``PADDING_EXAMPLE``: fully masked rows, so they add nothing to the loss; ``collate.PADDING_PAIR`` for
    preference pairs) up to a multiple of ``micro_batch_size * dp_size``. Padding rather than a short batch keeps
    every rank running the same number of full micro batches, which the collective loss reduction (and pipeline
    schedules) require.
    """
    num_micro_batches(global_batch_size, micro_batch_size, dp_size)
    _check_rank(dp_rank, dp_size)
    per_round = micro_batch_size * dp_size
    for start in range(0, len(examples), global_batch_size):
        batch = list(examples[start:start + global_batch_size])
        batch += [padding] * (-len(batch) % per_round)
        yield _rank_share(batch, micro_batch_size, dp_rank, dp_size)


def _rank_share(global_batch: list[T], micro_batch_size: int, dp_rank: int, dp_size: int) -> MicroBatches[T]:
    """Rank ``dp_rank``'s contiguous ``1/dp_size`` of ``global_batch``, cut into micro batches."""
    share = len(global_batch) // dp_size
    mine = global_batch[dp_rank * share:(dp_rank + 1) * share]
    return [mine[i:i + micro_batch_size] for i in range(0, share, micro_batch_size)]


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
