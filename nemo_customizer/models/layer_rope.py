"""RoPE per layer kind: Gemma 3's sliding-window layers rotate with their own base (``rope_local_base_freq``,
never scaled), its full-attention layers with ``rope_theta`` and ``rope_scaling``.

mcore computes one RoPE table per forward and hands it to every layer. The model (``models.gpt``) hands a
:class:`LayerRotary` instead, both tables, and each layer's :class:`LayerKindSelfAttention` picks its own before
mcore's attention runs; packed batches carry both per-token cos/sin in ``PackedRotaryParams`` the same way. The
rest of attention (KV cache slicing during generation included) sees one table, as for any other family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention

from nemo_customizer.models.rope import PackedRotaryParams


@dataclass(frozen=True)
class LayerRotary:
    """The RoPE tables (mcore's ``[s, 1, 1, head_dim]``, fp32) of full-attention and sliding-window layers."""

    full: torch.Tensor
    sliding: torch.Tensor


class LayerKindSelfAttention(SelfAttention):
    """mcore's self-attention that takes the RoPE of its layer kind from a :class:`LayerRotary` (padded batches)
    or from ``PackedRotaryParams``' sliding cos/sin (packed batches)."""

    def __init__(self, config, submodules, layer_number, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.sliding = bool(is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number))

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if isinstance(rotary_pos_emb, LayerRotary):
            rotary_pos_emb = rotary_pos_emb.sliding if self.sliding else rotary_pos_emb.full
        if self.sliding and isinstance(packed_seq_params, PackedRotaryParams) \
                and packed_seq_params.sliding_rotary_cos is not None:
            packed_seq_params = dataclasses.replace(packed_seq_params, rotary_cos=packed_seq_params.sliding_rotary_cos,
                                                    rotary_sin=packed_seq_params.sliding_rotary_sin)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                               packed_seq_params=packed_seq_params, **kwargs)
