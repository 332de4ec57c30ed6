"""Rotary position embedding for packed (THD) batches: per-token cos/sin built once per forward, not per layer.

mcore applies RoPE to packed sequences by splitting every layer's query and key per sequence and reading the
sequence boundaries back from the GPU (``.tolist()`` / ``.item()``), twice per layer: each read stalls the CPU
until the GPU has caught up, so kernel launches can no longer run ahead. Packed batches already carry per-token
positions (restarting at 0 for each example), so the model gathers cos/sin for every token once and the core
attention rotates query and key with them: no split, no host sync, one fused kernel on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_customizer.models.fused import fused_on_cuda


@dataclass
class PackedRotaryParams(PackedSeqParams):
    """Packed-sequence parameters plus the per-token rotary cos/sin (``[t, 1, head_dim]``, activation dtype)."""

    rotary_cos: Optional[torch.Tensor] = None
    rotary_sin: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, params: PackedSeqParams, freqs: torch.Tensor, position_ids: torch.Tensor,
              dtype: torch.dtype) -> "PackedRotaryParams":
        """``freqs``: mcore's rotary table ``[max_len, 1, 1, head_dim]`` (fp32); ``position_ids``: ``[1, t]``."""
        per_token = freqs[position_ids.reshape(-1)].squeeze(1)  # [t, 1, head_dim]
        fields = {name: getattr(params, name) for name in params.__dataclass_fields__}
        return cls(**fields, rotary_cos=per_token.cos().to(dtype), rotary_sin=per_token.sin().to(dtype))


def rotate(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE (``transformers``' non-interleaved rotate-half form) on ``[t, heads, head_dim]`` query and key."""
    cos, sin = cos.to(query.dtype), sin.to(query.dtype)  # a model cast after it was built keeps its old params_dtype
    return _fused_rotate(query, key, cos, sin)


def _rotate(query, key, cos, sin):
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


_fused_rotate = fused_on_cuda(_rotate)
