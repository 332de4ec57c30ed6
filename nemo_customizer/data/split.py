"""Seeded hold-out of a validation set, for datasets that ship without validation files; seeded disjoint splits for
data preparation."""

from __future__ import annotations

import random
from typing import Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def num_val_rows(n_rows: int, val_fraction: float) -> int:
    """Rows to hold out: ``round(n_rows * val_fraction)``, at least 1 when there are >= 2 rows, never all of them.

    ``val_fraction == 0`` holds out nothing (the caller asked for no validation).
    """
    check_val_fraction(val_fraction)
    if val_fraction == 0.0 or n_rows < 2:
        return 0
    return min(max(1, round(n_rows * val_fraction)), n_rows - 1)


def split_rows(rows: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split ``rows`` into ``(train, val)`` with a seeded random choice of validation rows.

    Both parts keep the original row order (training shuffles per epoch anyway), so the result only depends on
    ``len(rows)``, ``val_fraction`` and ``seed``.
    """
    n_val = num_val_rows(len(rows), val_fraction)
    val_idx = set(np.random.default_rng(seed).permutation(len(rows))[:n_val].tolist())
    train = [row for i, row in enumerate(rows) if i not in val_idx]
    val = [row for i, row in enumerate(rows) if i in val_idx]
    return train, val


def cap_rows(rows: Sequence[T], max_rows: Optional[int], seed: int) -> list[T]:
    """At most ``max_rows`` of ``rows``: a seeded random subset in original order (all rows when ``None``)."""
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
    if max_rows is None or len(rows) <= max_rows:
        return list(rows)
    keep = set(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False).tolist())
    return [row for i, row in enumerate(rows) if i in keep]


def seeded_slices(items: Sequence[T], sizes: Sequence[int], seed: int) -> list[list[T]]:
    """A seeded shuffle of ``items``, then consecutive disjoint slices of ``sizes`` (training/validation/test files)."""
    if sum(sizes) > len(items):
        raise ValueError(f"asked for {sum(sizes)} rows in total but only {len(items)} are available")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    out, start = [], 0
    for size in sizes:
        out.append(shuffled[start:start + size])
        start += size
    return out
