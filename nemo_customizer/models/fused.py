"""Elementwise model functions as fused kernels on CUDA, with the same Python function as the CPU path."""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch


def fused_on_cuda(fn: Callable) -> Callable:
    """``fn``, run through ``torch.compile`` when its first argument is a CUDA tensor, eagerly otherwise.

    Eager, a chain like RMSNorm or RoPE is several kernels with temporaries in memory; compiled it is one kernel per
    direction. Compiled on first CUDA use (CPU runs never pay for it), with ``dynamic=True``: packed micro batches
    have a different token count every step, and one graph serves them all.

    Positional arguments are tensors; keyword arguments are constants baked into the compiled graph (one graph per
    distinct set of values). A Python float passed positionally would become a graph input, and with dynamic shapes
    dynamo turns it into a 0-d tensor that the graph reads back with ``.item()``: a host sync inside every call
    (RMSNorm's ``eps`` passed that way stalled the host twice per layer). ``.compiled(**constants)`` returns the
    compiled function itself (``tests/gpu/test_kernels_gpu.py`` compares it with ``fn``).

    Inductor's dynamic-shape kernels can run far below memory bandwidth (RoPE's did): the
    hottest of these functions have hand-written Triton kernels (``triton_kernel`` below) and keep this as fallback.
    """
    @functools.lru_cache(maxsize=None)
    def compiled_for(constants: tuple) -> Callable:
        values = dict(constants)

        def bound(*tensors):  # a closure, not functools.partial: dynamo's first frame must not take the constants
            return fn(*tensors, **values)

        return torch.compile(bound, dynamic=True)

    def compiled(**constants) -> Callable:
        return compiled_for(tuple(sorted(constants.items())))

    @functools.wraps(fn)
    def call(*tensors, **constants):
        return compiled(**constants)(*tensors) if tensors[0].is_cuda else fn(*tensors, **constants)

    call.compiled = compiled
    return call


@functools.lru_cache(maxsize=None)
def triton_kernel(module: str, name: str) -> Optional[Callable]:
    """``module.name``, a launcher of a hand-written Triton kernel, or None where Triton is not installed (CPU builds
    of torch): callers then take their torch path. Imported on first use: CPU runs never load Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return getattr(importlib.import_module(module), name)
