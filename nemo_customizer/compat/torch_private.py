"""torch's private helpers and protocols the library relies on, and its one measuring patch of torch (targets
torch 2.6 and later)."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from nemo_customizer.compat._patching import AttributePatches


def fused_optimizer_device_types() -> List[str]:
    """Device types torch's fused optimizer kernels (``fused=True`` Adam/AdamW) support, CPU included.

    torch keeps the list in the private ``torch.utils._foreach_utils._get_fused_kernels_supported_devices`` (torch
    2.x); an optimizer with ``fused=True`` on another device raises at its construction.
    """
    return list(_get_fused_kernels_supported_devices())


@contextlib.contextmanager
def adam_gradient_scaling(scales: Sequence[Tuple[torch.optim.Optimizer, torch.Tensor]],
                          found_inf: torch.Tensor) -> Iterator[None]:
    """Inside the block, each ``(adam, grad_scale)``'s next ``step()`` divides the gradients by ``grad_scale`` and
    skips the whole update (moments and step count included) when ``found_inf`` is non-zero; both stay on the device.

    torch 2.x's fused Adam/AdamW read these from the optimizer's ``grad_scale``/``found_inf`` attributes, the
    protocol ``torch.amp.GradScaler`` uses for optimizers with ``_step_supports_amp_scaling``
    (``training.bf16_adamw`` follows it too). They are removed after the block, so a later step is unscaled.
    """
    for adam, grad_scale in scales:
        adam.grad_scale, adam.found_inf = grad_scale, found_inf
    try:
        yield
    finally:
        for adam, _ in scales:
            del adam.grad_scale, adam.found_inf


@contextlib.contextmanager
def count_cuda_synchronize_callers() -> Iterator[Dict[str, int]]:
    """Count the calls of ``torch.cuda.synchronize`` inside the block by their calling line outside torch
    (``file.py:line``), in the dict it yields; for finding the host syncs of a step (``scripts/benchmark.py``).

    A wait inside ``torch.cuda.synchronize`` is not attributed to its caller by CUDA's sync debug mode, so the
    function is wrapped for the block and restored after it.
    """
    callers: Dict[str, int] = {}
    real_synchronize = torch.cuda.synchronize

    def traced_synchronize(*args, **kwargs):
        outside_torch = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
        site = f"{Path(outside_torch[-1].filename).name}:{outside_torch[-1].lineno}" if outside_torch else "?"
        callers[site] = callers.get(site, 0) + 1
        return real_synchronize(*args, **kwargs)

    patches = AttributePatches()
    patches.replace(torch.cuda, "synchronize", traced_synchronize)
    try:
        yield callers
    finally:
        patches.undo()
