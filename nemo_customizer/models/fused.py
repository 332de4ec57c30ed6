"""Elementwise model functions as fused kernels on CUDA, with the same Python function as the CPU path."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def fused_on_cuda(fn: Callable) -> Callable:
    """``fn``, run through ``torch.compile`` when its first argument is a CUDA tensor, eagerly otherwise.

    Eager, a chain like RMSNorm or RoPE is several kernels with temporaries in memory; compiled it is one kernel per
    direction. Compiled on first CUDA use (CPU runs never pay for it), with ``dynamic=True``: packed micro batches
    have a different token count every step, and one graph serves them all. ``.compiled()`` returns the compiled
    function itself (``scripts/gpu_check.py`` compares it with ``fn``).
    """
    @functools.lru_cache(maxsize=None)
    def compiled() -> Callable:
        return torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def call(*args):
        return compiled()(*args) if args[0].is_cuda else fn(*args)

    call.compiled = compiled
    return call
