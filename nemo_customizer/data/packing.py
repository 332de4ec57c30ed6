"""Sequence packing: bins of whole examples, sized and counted so that an optimizer step keeps the tokens (and an
epoch the steps) of the same job unpacked.

Pure functions of example lengths (no torch, no megatron); they work for any format, since they only see
``TokenizedExample`` lengths. Preference pairs (``plan_pair_packing``) are packed whole: both sequences of a pair in
one bin, each its own segment. ``collate_packed`` (in ``collate``) turns a micro batch of bins into one THD row whose
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
from nemo_customizer.data.examples import TokenizedExample, TokenizedPair

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
                     pad_to_multiple_of: int = 1, packed: bool = False, widths: Sequence[int] | None = None,
                     rows_per_item: int = 1) -> float:
    """Share of padding among the positions the model computes on in epoch 0 (its order, full steps only).

    ``positions[i]`` is item ``i``'s positions after the shift (``len(input_ids) - 1`` for an example, the sum of
    those for a bin or a pair). Unpacked, a micro batch is right-padded to its longest row (``collate``): an item
    is ``rows_per_item`` rows (2 for a preference pair) of at most ``widths[i]`` positions (default
    ``positions[i]``); packed, its items are joined into one row padded only to ``pad_to_multiple_of``
    (``collate_packed``).
    """
    widths = positions if widths is None else widths
    order = epoch_order(len(positions), seed, 0)[:steps_per_epoch(len(positions), batch_size) * batch_size]
    real = padded = 0
    for start in range(0, len(order), micro_batch_size):
        micro = order[start:start + micro_batch_size]
        real += sum(positions[i] for i in micro)
        padded += _round_up(sum(positions[i] for i in micro), pad_to_multiple_of) if packed else \
            len(micro) * rows_per_item * _round_up(max(widths[i] for i in micro), pad_to_multiple_of)
    return 1.0 - real / padded if padded else 0.0


@dataclass(frozen=True)
class PackingPlan:
    """Bins and batch sizes for packed training; ``describe()`` is the job-log line."""

    bins: list[list[int]]
    """Example indices of each bin."""
    max_seq_length: int
    bin_capacity: int
    """Most input tokens a bin holds: ``max_bin_tokens``, or less where full-length bins would hold more than a
    step's worth of examples (``bin_capacity_for_step``)."""
    batch_size: int
    """The requested global batch size, in examples (pairs)."""
    global_batch_size: int
    """Bins per optimizer step (all data-parallel ranks)."""
    micro_batch_size: int
    """Bins per micro batch; ``collate_packed`` joins them into one THD row."""
    padding_before: float
    """Padding share of unpacked (right-padded) training micro batches."""
    padding_after: float
    """Padding share of packed rows (only the rounding to ``pad_to_multiple_of``)."""
    bin_fill: float
    """Mean share of ``bin_capacity`` a bin fills."""
    n_examples: int
    """Examples, or preference pairs (``unit``), packed."""
    n_tokens: int
    """Input tokens of all examples."""
    unit: str = "examples"
    """What a bin holds whole: ``examples``, or ``pairs`` (a pair's chosen and rejected sequences, side by side)."""

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

    @property
    def tokens_per_step(self) -> float:
        """Input tokens an optimizer step sees, on average."""
        return self.global_batch_size * self.n_tokens / max(len(self.bins), 1)

    @property
    def requested_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the same job unpacked."""
        return steps_per_epoch(self.n_examples, self.batch_size)

    @property
    def requested_tokens_per_step(self) -> float:
        """Input tokens an optimizer step of the same job unpacked sees, on average (``batch_size`` examples)."""
        return self.batch_size * self.n_tokens / max(self.n_examples, 1)

    @property
    def max_bin_tokens(self) -> int:
        """The largest bin capacity: ``max_seq_length``, or twice it for pairs (two sequences of up to
        ``max_seq_length`` each, as an unpacked micro batch of one pair holds)."""
        return self.max_seq_length * (2 if self.unit == "pairs" else 1)

    def describe(self) -> str:
        limit = f"max_seq_length {self.max_seq_length}" if self.unit == "examples" else \
            f"2 x max_seq_length {self.max_seq_length}"
        capacity = (f"{self.bin_capacity} tokens (smaller than {limit}, so that a step keeps its tokens)"
                    if self.bin_capacity < self.max_bin_tokens else f"{self.bin_capacity} tokens")
        return (f"sequence packing: {self.n_examples} {self.unit} in {len(self.bins)} bins of <= {capacity}, packing "
                f"factor {self.packing_factor:.2f}; batch_size {self.batch_size} {self.unit} -> "
                f"{self.global_batch_size} bins per step (micro batch {self.micro_batch_size} bins); tokens per step "
                f"{self.tokens_per_step:,.0f} (unpacked: {self.requested_tokens_per_step:,.0f}), steps per epoch "
                f"{self.steps_per_epoch} (unpacked: {self.requested_steps_per_epoch}); padding "
                f"{100 * self.padding_before:.1f}% (padded batches) -> {100 * self.padding_after:.1f}% (packed; bins "
                f"{100 * self.bin_fill:.1f}% full)")


TOKENS_PER_STEP_TOLERANCE = 0.05
"""Full-length bins are kept while their rounded bin count per step is within this share of the requested tokens per
step; beyond it the bins shrink (``bin_capacity_for_step``)."""


def bin_capacity_for_step(lengths: Sequence[int], max_seq_length: int, batch_size: int,
                          dp_size: int) -> tuple[int, list[list[int]]]:
    """The bin capacity (and its bins) that lets whole bins make up a step of ``batch_size`` examples' tokens.

    With full-length bins of ``factor`` examples each, a step takes ``round(batch_size / factor)`` bins, at least one
    per data-parallel rank. Where that rounding moves the tokens per step by more than
    ``TOKENS_PER_STEP_TOLERANCE`` (short examples: one bin already holds more than a step's examples), the step gets
    ``k`` bins per rank, ``k = ceil(batch_size / (dp_size * factor))``, and the bins shrink until they hold
    ``batch_size / (k * dp_size)`` examples on average: the capacity is the smallest whose bin count does not exceed
    the target, or the next smaller one where that is closer (bisection; bin counts fall as capacity grows). The
    capacity never exceeds ``max_seq_length``, nor falls below the longest example.
    """
    full = pack_lengths(lengths, max_seq_length)
    if not lengths:
        return max_seq_length, full
    factor = len(lengths) / len(full)
    rounded_bins = max(dp_size, _round_half_up(batch_size / factor / dp_size) * dp_size)
    if abs(rounded_bins * factor / batch_size - 1) <= TOKENS_PER_STEP_TOLERANCE:
        return max_seq_length, full
    bins_per_step = dp_size * math.ceil(batch_size / (dp_size * factor))
    target_bins = len(lengths) * bins_per_step / batch_size  # bins of batch_size / bins_per_step examples each
    low, high = max(lengths), max_seq_length  # the answer lies in [low, high]; high's bins are few enough
    packed = {high: full}
    while low < high:
        middle = (low + high) // 2
        packed[middle] = pack_lengths(lengths, middle)
        if len(packed[middle]) <= target_bins:
            high = middle
        else:
            low = middle + 1
    below = high - 1
    if below >= max(lengths):
        packed.setdefault(below, pack_lengths(lengths, below))
        if abs(len(packed[below]) - target_bins) < abs(len(packed[high]) - target_bins):
            return below, packed[below]
    return high, packed[high]


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
    """Pack ``examples`` into bins that keep the tokens per optimizer step and the steps per epoch of the unpacked
    job (``bin_capacity_for_step``), and derive the bin batch sizes (``packed_batch_sizes``).

    Peak activation memory never exceeds the unpacked job's worst case: a packed micro batch holds at most
    ``micro_batch_size`` bins of at most ``max_seq_length`` tokens.
    """
    lengths = [len(e.input_ids) for e in examples]
    positions = [max(n - 1, 0) for n in lengths]
    return _plan(lengths, positions, positions, 1, "examples", max_seq_length=max_seq_length, batch_size=batch_size,
                 micro_batch_size=micro_batch_size, dp_size=dp_size, seed=seed, pad_to_multiple_of=pad_to_multiple_of)


def plan_pair_packing(
    pairs: Sequence[TokenizedPair],
    *,
    max_seq_length: int,
    batch_size: int,
    micro_batch_size: int,
    dp_size: int,
    seed: int,
    pad_to_multiple_of: int = 1,
) -> PackingPlan:
    """``plan_packing`` for preference pairs: a bin holds whole pairs (both sequences of each, for the loss that
    compares them) in at most ``2 x max_seq_length`` tokens, and ``batch_size``/``micro_batch_size`` count pairs.

    An unpacked micro batch of one pair is two rows of up to ``max_seq_length`` tokens, so a bin of twice that keeps
    the activation memory of the unpacked worst case, as ``plan_packing`` does.
    """
    lengths = [p.length for p in pairs]
    widths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) - 1 for p in pairs]
    positions = [len(p.chosen.input_ids) + len(p.rejected.input_ids) - 2 for p in pairs]
    return _plan(lengths, positions, widths, 2, "pairs", max_seq_length=max_seq_length, batch_size=batch_size,
                 micro_batch_size=micro_batch_size, dp_size=dp_size, seed=seed, pad_to_multiple_of=pad_to_multiple_of)


def _plan(lengths: Sequence[int], positions: Sequence[int], widths: Sequence[int], rows_per_item: int, unit: str, *,
          max_seq_length: int, batch_size: int, micro_batch_size: int, dp_size: int, seed: int,
          pad_to_multiple_of: int) -> PackingPlan:
    """The plan of items with input ``lengths`` (tokens a bin holds), ``positions`` after the shift and unpacked
    row ``widths`` (``rows_per_item`` rows each)."""
    max_bin_tokens = max_seq_length * rows_per_item
    capacity, bins = bin_capacity_for_step(lengths, max_bin_tokens, batch_size, dp_size)
    factor = len(lengths) / max(len(bins), 1)
    global_bins, micro_bins = packed_batch_sizes(batch_size, micro_batch_size, dp_size, max(factor, 1.0))
    bin_positions = [sum(positions[i] for i in b) for b in bins]
    return PackingPlan(
        bins=bins, max_seq_length=max_seq_length, bin_capacity=capacity, batch_size=batch_size,
        global_batch_size=global_bins, micro_batch_size=micro_bins,
        padding_before=padding_fraction(positions, batch_size=batch_size, micro_batch_size=micro_batch_size,
                                        seed=seed, pad_to_multiple_of=pad_to_multiple_of, widths=widths,
                                        rows_per_item=rows_per_item),
        padding_after=padding_fraction(bin_positions, batch_size=global_bins, micro_batch_size=micro_bins,
                                       seed=seed, pad_to_multiple_of=pad_to_multiple_of, packed=True),
        bin_fill=sum(lengths) / max(len(bins) * capacity, 1), n_examples=len(lengths), n_tokens=sum(lengths),
        unit=unit,
    )
