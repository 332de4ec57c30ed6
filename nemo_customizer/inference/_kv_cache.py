"""KV caches over megatron-core's ``StaticInferenceContext``: exact per-prompt prefill, then batched decoding.

mcore's static context stores keys/values per layer as ``[max_seq, max_batch, kv_heads, head_dim]`` *before* RoPE
and rotates all cached keys by their cache index on every forward (transformer/attention.py
``_adjust_key_value_for_inference``), with one ``sequence_len_offset`` for the whole batch. Prompts of different
lengths are therefore prefilled one at a time (no padding, exactly like training), then placed right-aligned in
one batch cache for decoding: row ``i`` of length ``n_i`` occupies cache indices ``L - n_i .. L - 1`` (``L`` the
longest prompt). Its tokens sit ``L - n_i`` positions later than in training, but RoPE attention depends only on
relative positions, so the scores are the same; the cache slots before a row's prompt are masked out.
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def _context(batch: int, capacity: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size=batch, max_sequence_length=capacity)


def _logits(model, context, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Feed ``tokens`` ``(b, s)`` at the context's offset; logits ``(b, vocab)`` of the last position."""
    start = context.sequence_len_offset
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)  # (b, s)
    # materialize_only_last_token_logits (on by default): mcore projects only the last position onto the vocabulary
    logits = model(tokens, positions, attention_mask, inference_context=context,
                   runtime_gather_output=True)  # (b, 1, vocab)
    context.increment_sequence_len_offset(tokens.shape[1])
    return logits[:, -1]


class BatchKVCache:
    """Prefill each prompt exactly, then decode all of them one token per row per ``decode`` call."""

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 device: torch.device):
        self.model = model
        self.device = device
        self.pad = None
        if len(prompts) == 1:  # a lone prompt keeps decoding in its own cache: nothing to align or mask
            logits, self.context = self._prefill(prompts[0], room=max_new_tokens)
            self.first_logits = logits[None]  # (1, vocab)
        else:
            longest = max(len(ids) for ids in prompts)
            capacity = longest + max_new_tokens
            self.context = _context(len(prompts), capacity)
            # (b, capacity): True marks the cache slots before a row's prompt, which it must not attend to
            starts = torch.tensor([longest - len(ids) for ids in prompts], device=device)
            self.pad = torch.arange(capacity, device=device)[None, :] < starts[:, None]
            first = []
            for row, ids in enumerate(prompts):
                logits, single = self._prefill(ids, room=0)
                first.append(logits)
                self._place(single, row, start=longest - len(ids))
            self.first_logits = torch.stack(first)  # (b, vocab)
            self.context.sequence_len_offset = longest
        self.context.enable_decode_mode()

    def _prefill(self, ids: Sequence[int], room: int):
        context = _context(1, len(ids) + room)
        logits = _logits(self.model, context, torch.tensor([list(ids)], dtype=torch.long, device=self.device))
        return logits[0], context

    def _place(self, single, row: int, start: int) -> None:
        """Copy a one-prompt cache into batch row ``row`` at cache index ``start`` (right-aligned)."""
        memory = self.context.key_value_memory_dict
        for layer, (k, v) in single.key_value_memory_dict.items():  # (n, 1, kv_heads, head_dim)
            if layer not in memory:  # (capacity, b, kv_heads, head_dim), shaped like mcore's own buffers
                shape = (self.context.max_sequence_length, self.context.max_batch_size, *k.shape[2:])
                memory[layer] = tuple(torch.zeros(shape, dtype=k.dtype, device=self.device) for _ in range(2))
            key, value = memory[layer]
            key[start:start + k.shape[0], row] = k[:, 0]
            value[start:start + v.shape[0], row] = v[:, 0]

    def decode(self, tokens: List[int]) -> torch.Tensor:
        """Feed one token per row; logits ``(b, vocab)`` for the next one."""
        mask = None
        if self.pad is not None:  # mcore's convention: True = may not attend; (b, 1, 1, keys so far)
            mask = self.pad[:, None, None, :self.context.sequence_len_offset + 1]
        tokens_in = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (b, 1)
        return _logits(self.model, self.context, tokens_in, mask)
