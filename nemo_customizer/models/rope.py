"""Rotary position embedding for packed (THD) batches: per-token cos/sin built once per forward, not per layer.

mcore applies RoPE to packed sequences by splitting every layer's query and key per sequence and reading the
sequence boundaries back from the GPU (``.tolist()`` / ``.item()``), twice per layer: each read stalls the CPU
until the GPU has caught up, so kernel launches can no longer run ahead. Packed batches already carry per-token
positions (restarting at 0 for each example), so the model gathers cos/sin for every token once and the core
attention rotates query and key with them: no split, no host sync, one Triton kernel per tensor and direction on
CUDA (``models.rope_kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_customizer.models.fused import fused_on_cuda, triton_kernel


@dataclass
class PackedRotaryParams(PackedSeqParams):
    """Packed-sequence parameters plus the per-token rotary cos/sin (``[t, 1, head_dim]``, activation dtype), and
    those of sliding-window layers where they rotate with their own base (``models.layer_rope``)."""

    rotary_cos: Optional[torch.Tensor] = None
    rotary_sin: Optional[torch.Tensor] = None
    sliding_rotary_cos: Optional[torch.Tensor] = None
    sliding_rotary_sin: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, params: PackedSeqParams, angles: torch.Tensor, dtype: torch.dtype,
              sliding_angles: Optional[torch.Tensor] = None) -> "PackedRotaryParams":
        """``angles``: each token's RoPE angles ``[t, 1, head_dim]`` (fp32, :func:`token_angles`);
        ``sliding_angles``: the sliding-window layers' own, where they differ."""
        fields = {name: getattr(params, name) for name in params.__dataclass_fields__}
        if sliding_angles is not None:
            fields["sliding_rotary_cos"], fields["sliding_rotary_sin"] = _cos_sin(sliding_angles, dtype)
        cos, sin = _cos_sin(angles, dtype)
        return cls(**fields, rotary_cos=cos, rotary_sin=sin)


def token_angles(freqs: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's row ``[t, 1, head_dim]`` of mcore's rotary table ``freqs`` (``[max_len, 1, 1, head_dim]``,
    fp32), by its ``position_ids`` (``[1, t]``)."""
    return freqs[position_ids.reshape(-1)].squeeze(1)


def _cos_sin(angles: torch.Tensor, dtype: torch.dtype):
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE (``transformers``' non-interleaved rotate-half form) on ``[t, heads, head_dim]`` query and key."""
    cos, sin = cos.to(query.dtype), sin.to(query.dtype)  # a model cast after it was built keeps its old params_dtype
    if query.is_cuda and _rotate_kernel() is not None and cos.shape[-1] == query.shape[-1]:
        return RotateHalf.apply(query, key, cos, sin)
    return _fused_rotate(query, key, cos, sin)


def _rotate(query, key, cos, sin):
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


_fused_rotate = fused_on_cuda(_rotate)


def rotate_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """One tensor rotated (``inverse``: by the transposed rotation, which is the backward): the Triton kernel on
    CUDA, the same arithmetic in torch elsewhere (how CPU tests check ``RotateHalf``'s backward)."""
    kernel = _rotate_kernel() if x.is_cuda else None
    if kernel is not None:
        return kernel(x, cos, sin, inverse)
    if inverse:  # (x1 c1 + x2 s2, x2 c2 - x1 s1)
        return x * cos - _rotate_half(x * sin)
    return x * cos + _rotate_half(x) * sin


class RotateHalf(torch.autograd.Function):
    """``_rotate`` with a hand-written backward: the inverse rotation of the incoming gradients."""

    @staticmethod
    def forward(ctx, query, key, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate_one(query, cos, sin, inverse=False), rotate_one(key, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        cos, sin = ctx.saved_tensors
        return rotate_one(grad_query, cos, sin, inverse=True), rotate_one(grad_key, cos, sin, inverse=True), None, None


def _rotate_kernel():
    return triton_kernel("nemo_customizer.models.rope_kernel", "rotate_half_triton")
