"""Mixing weights: how many training rows each of several datasets gives, and which.

The mixture's training set has as many rows as its sources' training sets together (``N = sum(n_i)``). Source ``i``
gives ``k_i`` of them, its weight's share of ``N`` (``w_i / sum(w) * N``, rounded by largest remainder so the counts
add up to ``N``). A source whose share is smaller than its size gives a seeded random subset of its rows; a larger
share repeats all its rows ``k_i // n_i`` times plus a seeded subset of ``k_i % n_i`` rows. The draw depends only on
the sizes, the weights and the seed, and is made once per job: every epoch trains on the same rows, in a new order.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def check_weights(weights: Sequence[float]) -> None:
    """At least one weight, each positive and finite (``ValueError`` otherwise)."""
    if not weights or any(not 0 < w < float("inf") for w in weights):
        raise ValueError(f"mixing weights must be positive and finite, got {list(weights)}")


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Training rows drawn from each source: the weights' shares of ``sum(sizes)``, adding up to it exactly."""
    check_weights(weights)
    if len(sizes) != len(weights):
        raise ValueError(f"need one weight per source, got {len(weights)} weights for {len(sizes)} sources")
    total = sum(sizes)
    shares = [w / sum(weights) * total for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def draw_rows(rows: Sequence[T], count: int, seed: int, source: int) -> list[T]:
    """``count`` rows of ``rows``: whole copies, then a seeded subset in original order (see the module docstring).

    ``source`` (the source's index) is mixed into the seed, so two sources of one size draw different subsets.
    """
    if not rows:
        raise ValueError("cannot draw rows from a source without training rows")
    copies, extra = divmod(count, len(rows))
    keep = np.sort(np.random.default_rng([seed, source]).permutation(len(rows))[:extra])
    return list(rows) * copies + [rows[i] for i in keep.tolist()]


def mix_rows(sources: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> list[T]:
    """The mixture's training rows: each source's draw, sources in order."""
    counts = mixture_counts([len(rows) for rows in sources], weights)
    return [row for i, (rows, count) in enumerate(zip(sources, counts)) for row in draw_rows(rows, count, seed, i)]
