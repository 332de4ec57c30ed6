"""The SwiGLU activation of our MLP: ``silu(gate) * up`` over fc1's fused gate|up output, with a hand-written backward.

mcore's MLP calls it on the whole fc1 output when the layer spec names it as ``MLPSubmodules.activation_func``
(the hook mcore calls ``use_te_activation_func``; nothing of Transformer Engine is involved). On CUDA both
directions are Triton kernels (``models.swiglu_kernel``) with a hand-written backward. Like mcore's fused
SwiGLU it keeps only its input for backward. Elsewhere the module is autograd of the formula; ``SwiGLUFunction``'s
torch path (what CPU tests check its hand-written backward with) does the same arithmetic as the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_customizer.models.fused import triton_kernel


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``x = [..., 2·width]`` (gate first, then up, as fc1 lays them out)."""
    kernel = _kernel("swiglu_forward_triton") if x.is_cuda else None
    if kernel is not None:
        return kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``swiglu`` with respect to ``x`` for the output gradient ``grad``."""
    kernel = _kernel("swiglu_backward_triton") if x.is_cuda else None
    if kernel is not None:
        return kernel(grad, x)
    gate, up = x.chunk(2, dim=-1)
    sigmoid = torch.sigmoid(gate)
    return torch.cat([grad * up * sigmoid * (1 + gate * (1 - sigmoid)), grad * gate * sigmoid], dim=-1)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return swiglu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return swiglu_backward(grad, x)


class SwiGLU(torch.nn.Module):
    """``MLPSubmodules.activation_func``: mcore builds it with the layer's config, which it does not need."""

    def __init__(self, config=None, **_unused):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and _kernel("swiglu_forward_triton") is not None:
            return SwiGLUFunction.apply(x)
        return swiglu(x)  # autograd of the formula: fewer passes on a CPU than our torch backward

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # mcore's MLP asks each submodule for its checkpoint shards: no parameters, no shards


def _kernel(name: str):
    return triton_kernel("nemo_customizer.models.swiglu_kernel", name)
