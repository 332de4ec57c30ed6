"""The GeGLU activation of Gemma's MLP: ``gelu_tanh(gate) * up`` over fc1's fused gate|up output.

Like ``models.swiglu.SwiGLU`` it is ``MLPSubmodules.activation_func`` in the layer spec (mcore calls it on the whole
fc1 output). The GELU is the tanh approximation (``transformers``' ``gelu_pytorch_tanh``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_customizer.models.fused import fused_on_cuda


def geglu(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` of ``x = [..., 2·width]`` (gate first, then up, as fc1 lays them out)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


_fused_geglu = fused_on_cuda(geglu)  # eager it is several kernels with temporaries


class GeGLU(torch.nn.Module):
    """``MLPSubmodules.activation_func``: mcore builds it with the layer's config, which it does not need."""

    def __init__(self, config=None, **_unused):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused_geglu(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # no parameters, no checkpoint shards
