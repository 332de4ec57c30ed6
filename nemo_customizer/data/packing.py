"""Sequence packing: bins of whole examples, and the batch-size rule that keeps tokens per optimizer step.

Pure functions of example lengths (no torch, no megatron); they work for any format, since they only see
``TokenizedExample`` lengths. ``collate_packed`` (in ``collate``) turns a micro batch of bins into one THD row whose
``cu_seqlens`` keep attention, positions and labels inside each example.

The bins are computed once per job (deterministic); each epoch reshuffles the *bin order* with the seeded
``epoch_order``, exactly as unpacked training reshuffles examples.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

from nemo_customizer.data.batching import epoch_order, steps_per_epoch
from nemo_customizer.data.examples import TokenizedExample

Bin = tuple[TokenizedExample, ...]
"""Whole examples that share one packed row (at most ``max_seq_length`` input tokens in all)."""


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose lengths sum to at most ``capacity``: best-fit decreasing.

    Items go longest first (ties by index) into the open bin with the *least* room that still fits them, else a new
    bin. Best-fit decreasing has first-fit decreasing's worst-case guarantee (at most 11/9·OPT + 6/9 bins) and
    leaves tighter gaps in practice. Deterministic: the same lengths always give the same bins. Bins are returned in
    the order they were opened; each lists its items in the order they were placed (longest first).
    O(n log n) searches (plus C-speed list moves).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} item(s) are longer than the bin capacity {capacity} "
                         f"(e.g. index {too_long[0]} with length {lengths[too_long[0]]})")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free capacity, bin index), sorted: the best fit is the first entry >= n
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
            continue
        free, b = room.pop(at)
        bins[b].append(i)
        bisect.insort(room, (free - n, b))
    return bins


def pack_examples(examples: Sequence[TokenizedExample], max_seq_length: int) -> list[Bin]:
    """Examples grouped into bins of at most ``max_seq_length`` input tokens (``pack_lengths`` on their lengths)."""
    return [tuple(examples[i] for i in b) for b in pack_lengths([len(e.input_ids) for e in examples],
                                                                   max_seq_length)]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def packed_batch_sizes(batch_size: int, micro_batch_size: int, dp_size: int, packing_factor: float) -> tuple[int, int]:
    """``(global, micro)`` batch sizes in bins that keep, on average, the tokens of ``batch_size`` examples per step.

    Global: ``max(1, round(batch_size / factor))`` rounded to a multiple of ``dp_size`` (at least one bin per rank).
    Micro: the largest divisor of ``global / dp_size`` not above ``round(micro_batch_size / factor)`` (at least 1),
    so a packed micro batch holds about as many tokens as an unpacked one (never more rows than
    ``micro_batch_size``: packing does not raise peak activation memory) and tokens per step stay the priority.
    """
    if packing_factor < 1.0:
        raise ValueError(f"packing_factor is examples per bin, so >= 1; got {packing_factor}")
    target = max(1, _round_half_up(batch_size / packing_factor))
    per_rank = max(1, _round_half_up(target / dp_size))
    wanted = max(1, _round_half_up(micro_batch_size / packing_factor))
    micro = max(d for d in range(1, min(wanted, per_rank) + 1) if per_rank % d == 0)
    return per_rank * dp_size, micro


def _round_up(n: int, multiple: int) -> int:
    return max(1, math.ceil(n / multiple)) * multiple


def padding_fraction(positions: Sequence[int], *, batch_size: int, micro_batch_size: int, seed: int,
                     pad_to_multiple_of: int = 1, packed: bool = False) -> float:
    """Share of padding among the positions the model computes on in epoch 0 (its order, full steps only).

    ``positions[i]`` is item ``i``'s positions after the shift (``len(input_ids) - 1`` for an example, the sum of
    those for a bin). Unpacked, a micro batch is right-padded to its longest row (``collate``); packed, its items are
    joined into one row padded only to ``pad_to_multiple_of`` (``collate_packed``).
    """
    order = epoch_order(len(positions), seed, 0)[:steps_per_epoch(len(positions), batch_size) * batch_size]
    real = padded = 0
    for start in range(0, len(order), micro_batch_size):
        micro = [positions[i] for i in order[start:start + micro_batch_size]]
        real += sum(micro)
        padded += _round_up(sum(micro), pad_to_multiple_of) if packed else \
            len(micro) * _round_up(max(micro), pad_to_multiple_of)
    return 1.0 - real / padded if padded else 0.0


@dataclass(frozen=True)
class PackingPlan:
    """Bins and batch sizes for packed training; ``describe()`` is the job-log line."""

    bins: list[list[int]]
    """Example indices of each bin."""
    max_seq_length: int
    batch_size: int
    """The requested global batch size, in examples."""
    global_batch_size: int
    """Bins per optimizer step (all data-parallel ranks)."""
    micro_batch_size: int
    """Bins per micro batch; ``collate_packed`` joins them into one THD row."""
    padding_before: float
    """Padding share of unpacked (right-padded) training micro batches."""
    padding_after: float
    """Padding share of packed rows (only the rounding to ``pad_to_multiple_of``)."""
    bin_fill: float
    """Mean share of ``max_seq_length`` a bin fills."""
    n_examples: int

    @property
    def packing_factor(self) -> float:
        """Examples per bin, on average."""
        return self.n_examples / max(len(self.bins), 1)

    def take(self, examples: Sequence[TokenizedExample]) -> list[Bin]:
        """The bins as tuples of ``examples`` (the list this plan was made from)."""
        return [tuple(examples[i] for i in b) for b in self.bins]

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.bins), self.global_batch_size)

    def describe(self) -> str:
        return (f"sequence packing: {self.n_examples} examples in {len(self.bins)} bins of <= {self.max_seq_length} "
                f"tokens, packing factor {self.packing_factor:.2f}; batch_size {self.batch_size} examples -> "
                f"{self.global_batch_size} bins per step (micro batch {self.micro_batch_size} bins), "
                f"{self.steps_per_epoch} steps per epoch; padding {100 * self.padding_before:.1f}% (padded batches) "
                f"-> {100 * self.padding_after:.1f}% (packed; bins {100 * self.bin_fill:.1f}% full)")


def plan_packing(
    examples: Sequence[TokenizedExample],
    *,
    max_seq_length: int,
    batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    seed: int,
    pad_to_multiple_of: int = 1,
) -> PackingPlan:
    """Pack ``examples``; derive the bin batch sizes that keep tokens per optimizer step (``packed_batch_sizes``)."""
    lengths = [len(e.input_ids) for e in examples]
    bins = pack_lengths(lengths, max_seq_length)
    factor = len(examples) / max(len(bins), 1)
    global_bins, micro_bins = packed_batch_sizes(batch_size, micro_batch_size, dp_size, max(factor, 1.0))
    example_positions = [max(n - 1, 0) for n in lengths]
    bin_positions = [sum(example_positions[i] for i in b) for b in bins]
    return PackingPlan(
        bins=bins, max_seq_length=max_seq_length, batch_size=batch_size, global_batch_size=global_bins,
        micro_batch_size=micro_bins,
        padding_before=padding_fraction(example_positions, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                        seed=seed, pad_to_multiple_of=pad_to_multiple_of),
        padding_after=padding_fraction(bin_positions, batch_size=global_bins, micro_batch_size=micro_bins,
                                       seed=seed, pad_to_multiple_of=pad_to_multiple_of, packed=True),
        bin_fill=sum(lengths) / max(len(bins) * max_seq_length, 1), n_examples=len(examples),
    )
