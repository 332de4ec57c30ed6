"""LongRoPE (Phi-3.5-mini, the Phi-3 128k checkpoints): two RoPE tables, the base frequencies divided per frequency
by the checkpoint's ``short_factor`` or ``long_factor``, and cos/sin multiplied by an attention factor.

transformers switches to the long factors for a whole forward once its highest position reaches
``original_max_position_embeddings`` (``modeling_rope_utils.dynamic_rope_update``), so there a short sequence's
logits depend on what it is batched with. Here every sequence uses the long factors exactly when it is longer than
``original_max_position_embeddings``, which is what transformers computes for that sequence alone:

- packed batches: each sequence by its own length (``cu_seqlens``), chosen per token on the device, no host sync;
- generation with the KV cache: each row by its tokens so far, prompt and generated ones (the keys its last query
  may see). Switching the table changes every layer's keys and values of the earlier tokens, not only the first
  layer's rotation, so a row that grows past the original context is prefilled again, whole and once
  (``inference.continuous``, at :func:`prefill_again_at`): its logits are transformers' over the whole sequence at
  every step. (transformers' own cache keeps what it computed with the short factors, so its cached generation past
  that point differs from its forward over the whole sequence.)
- padded batches without the KV cache (training, validation, scoring): by the batch's width. Their rows are
  right-padded without a mask, so the model cannot tell a row's own length; a row no longer than the original
  context, padded beside a longer one, takes the long factors, as it does in transformers' batch.

The attention factor multiplies queries and keys alike, so the family folds its square into the softmax scale
(``models.phi3``) instead of scaling cos and sin.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models.rope import token_angles


def inverse_frequencies(base: float, dim: int, factors: List[float]) -> torch.Tensor:
    """RoPE inverse frequencies divided by ``factors`` (one per frequency), in transformers' order of operations."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** exponents)


class LongRoPE(torch.nn.Module):
    """The long table of a longrope model (the model's own ``rotary_pos_emb`` holds the short one) and the rule that
    picks between them. A forward with a KV cache first calls :meth:`select_rows`; :meth:`table` then gives the
    table mcore rotates with."""

    def __init__(self, arch: ArchitectureConfig, kv_channels: int, device: torch.device):
        super().__init__()
        scaling = arch.rope_scaling
        self.original_max_position_embeddings = scaling.original_max_position_embeddings
        self.long = RotaryEmbedding(kv_channels=kv_channels, rotary_percent=1.0, use_cpu_initialization=True)
        self.long.inv_freq = inverse_frequencies(arch.rope_theta, kv_channels, scaling.long_factor).to(device)
        # for the next table() only: None (no KV cache), or whether the rows are past the original context (one
        # bool for all, or [b] on the device where rows have their own lengths)
        self._past_original: Union[None, bool, torch.Tensor] = None

    def select_rows(self, attention_mask: Optional[torch.Tensor], inference_context, new_tokens: int) -> None:
        """Before a forward: with a KV cache, each row's choice from its tokens so far; without one, none (the
        table then follows the batch's width)."""
        self._past_original = None
        if inference_context is None:
            return
        total = inference_context.sequence_len_offset + new_tokens
        if attention_mask is None:  # every row holds all ``total`` tokens
            self._past_original = total > self.original_max_position_embeddings
            return
        hidden = attention_mask[..., -1, :total]  # mcore's mask, True = not seen: the last query's row [b, 1, keys]
        lengths = total - hidden.reshape(hidden.shape[0], -1).sum(-1)  # [b] the keys before a row's tokens left out
        self._past_original = lengths > self.original_max_position_embeddings

    def table(self, short: torch.Tensor) -> torch.Tensor:
        """The RoPE table for this forward: ``short`` is mcore's ``[s, 1, 1, head_dim]`` (s: the width, or the KV
        cache's capacity); returns it, the long table, or ``[s, b, 1, head_dim]`` with each row's own."""
        past, self._past_original = self._past_original, None
        length = short.shape[0]
        if past is None:
            past = length > self.original_max_position_embeddings
        if isinstance(past, bool):
            return self.long(length) if past else short
        return torch.where(past[None, :, None, None], self.long(length), short)  # [s, b, 1, head_dim]

    def packed(self, short: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        """Per-token RoPE angles ``[t, 1, head_dim]`` of a packed row (``position_ids`` ``[1, t]``): each token's from
        the long table where its sequence is longer than the original context, else from ``short``
        (``[max_seqlen, 1, 1, head_dim]``)."""
        per_token = token_angles(short, position_ids)  # [t, 1, head_dim]
        if max_seqlen <= self.original_max_position_embeddings:
            return per_token
        positions = position_ids.reshape(-1)
        ends = cu_seqlens[1:].contiguous()
        lengths = ends - cu_seqlens[:-1]  # [sequences]
        sequence = torch.searchsorted(ends, torch.arange(positions.numel(), device=ends.device, dtype=ends.dtype),
                                      right=True).clamp_max(lengths.numel() - 1)  # [t]
        long_tokens = (lengths[sequence] > self.original_max_position_embeddings).to(per_token.device)
        long = token_angles(self.long(max_seqlen), position_ids)
        return torch.where(long_tokens[:, None, None], long, per_token)


def prefill_again_at(model: torch.nn.Module) -> Optional[int]:
    """The number of tokens whose forward is the first of a row past a longrope model's original context (where
    generation prefills the row again); None for other models."""
    while not hasattr(model, "long_rope") and hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    long_rope = getattr(model, "long_rope", None)
    return None if long_rope is None else long_rope.original_max_position_embeddings + 1
