"""RoPE per layer kind: Gemma 3's sliding-window layers rotate with their own base (``rope_local_base_freq``,
never scaled), its full-attention layers with ``rope_theta`` and ``rope_scaling``.

mcore computes one RoPE table per forward and hands it to every layer. The model (``models.gpt``) hands both
tables stacked into one tensor instead (:func:`stack_tables`; a tensor, because mcore's activation recomputation
saves the layer's inputs with ``save_for_backward``), and each layer's :class:`LayerKindSelfAttention` picks its own
before mcore's attention runs; packed batches carry both per-token cos/sin in ``PackedRotaryParams`` the same way. The
rest of attention (KV cache slicing during generation included) sees one table, as for any other family.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention

from nemo_customizer.models.rope import PackedRotaryParams


def stack_tables(full: torch.Tensor, sliding: torch.Tensor) -> torch.Tensor:
    """``[2, s, 1, 1, head_dim]``: the RoPE tables (mcore's ``[s, 1, 1, head_dim]``, fp32) of full-attention
    (index 0) and sliding-window layers (index 1)."""
    return torch.stack([full, sliding])


class LayerKindSelfAttention(SelfAttention):
    """mcore's self-attention that takes the RoPE of its layer kind from :func:`stack_tables`' tensor (padded
    batches) or from ``PackedRotaryParams``' sliding cos/sin (packed batches)."""

    def __init__(self, config, submodules, layer_number, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.sliding = bool(is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number))

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.dim() == 5:
            rotary_pos_emb = rotary_pos_emb[int(self.sliding)]
        if self.sliding and isinstance(packed_seq_params, PackedRotaryParams) \
                and packed_seq_params.sliding_rotary_cos is not None:
            packed_seq_params = dataclasses.replace(packed_seq_params, rotary_cos=packed_seq_params.sliding_rotary_cos,
                                                    rotary_sin=packed_seq_params.sliding_rotary_sin)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                               packed_seq_params=packed_seq_params, **kwargs)
