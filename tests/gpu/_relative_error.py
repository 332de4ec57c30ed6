"""How far our result is from its reference, the measures the GPU tests bound."""

from __future__ import annotations


def worst_rel(pairs) -> float:
    """The largest ``max|a - b| / max|b|`` over ``(ours, reference)`` pairs of tensors."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


def worst_step_rel(reference, losses) -> float:
    """The largest ``|a - b| / |a|`` over the per-step losses ``a`` of a reference job and ``b`` of another."""
    return max(abs(a - b) / abs(a) for a, b in zip(reference, losses))
