"""KV caches over megatron-core's ``StaticInferenceContext``: exact per-prompt prefill, then batched decoding of rows
that may join and leave between steps.

mcore's static context stores keys/values per layer as ``[max_seq, max_batch, kv_heads, head_dim]`` *before* RoPE
and rotates all cached keys by their cache index on every forward (transformer/attention.py
``_adjust_key_value_for_inference``), with one ``sequence_len_offset`` for the whole batch. Prompts of different
lengths are therefore prefilled one at a time (no padding, exactly like training), then placed right-aligned in
one batch cache for decoding: a row holding ``n_i`` tokens occupies cache indices ``L - n_i .. L - 1`` (``L`` the
longest row). Its tokens sit ``L - n_i`` positions later than in training, but RoPE attention depends only on
relative positions, so the scores are the same; the cache slots before a row's tokens are masked out.

Because cached keys are stored before RoPE, a row's cache can be moved to other indices freely. ``LiveKVCache``
uses that to let rows join and leave between decode steps (continuous batching): ``rebuild`` copies the rows that
stay, and the newly prefilled ones, into a fresh cache right-aligned at the longest of them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

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


def prefill(model: torch.nn.Module, ids: Sequence[int], device: torch.device):
    """Run one prompt alone from position 0; returns its next-token logits ``(vocab,)`` and its one-row cache."""
    context = _context(1, len(ids))
    logits = _logits(model, context, torch.tensor([list(ids)], dtype=torch.long, device=device))
    return logits[0], context


class LiveKVCache:
    """The decode cache of a batch whose rows change between steps.

    ``rebuild`` makes a new cache from rows that stay (by their index in the current cache) and newly prefilled
    one-row caches; ``decode`` then feeds one token per row. Row ``i`` of the cache is row ``i`` of the list the
    caller keeps; rows that finished simply stop being kept at the next rebuild.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.context = None
        self.starts: List[int] = []  # per row: the cache index of its first token
        self.pad: Optional[torch.Tensor] = None  # (rows, capacity) True before a row's first token; None: no gaps

    def rebuild(self, keep: Sequence[int], joining: Sequence, room: int) -> None:
        """Rows ``keep`` of this cache, then the one-row caches ``joining`` (``prefill``'s), with ``room`` more
        tokens for every row.

        All rows are right-aligned at the longest, so the left gap the previous layout may have had disappears and
        a lone row sits at positions ``0..n-1`` exactly as a single prompt does.
        """
        old = self.context
        old_end = old.sequence_len_offset if old is not None else 0
        pieces: List[Tuple[dict, int, int, int]] = []  # (memory dict, batch index, first index, length)
        for row in keep:
            pieces.append((old.key_value_memory_dict, row, self.starts[row], old_end - self.starts[row]))
        for single in joining:
            pieces.append((single.key_value_memory_dict, 0, 0, single.sequence_len_offset))
        if not pieces:
            self.context, self.starts, self.pad = None, [], None
            return
        longest = max(length for *_, length in pieces)
        capacity = longest + room
        context = _context(len(pieces), capacity)
        memory = context.key_value_memory_dict
        for row, (source, index, first, length) in enumerate(pieces):
            start = longest - length
            for layer, (k, v) in source.items():  # (cache len, batch, kv_heads, head_dim)
                if layer not in memory:  # shaped like mcore's own buffers
                    shape = (capacity, len(pieces), *k.shape[2:])
                    memory[layer] = tuple(torch.zeros(shape, dtype=k.dtype, device=self.device) for _ in range(2))
                key, value = memory[layer]
                key[start:longest, row] = k[first:first + length, index]
                value[start:longest, row] = v[first:first + length, index]
        context.sequence_len_offset = longest
        context.enable_decode_mode()
        self.context = context
        self.starts = [longest - length for *_, length in pieces]
        self.pad = None
        if any(self.starts):
            starts = torch.tensor(self.starts, device=self.device)
            self.pad = torch.arange(capacity, device=self.device)[None, :] < starts[:, None]

    def decode(self, model: torch.nn.Module, tokens: List[int]) -> torch.Tensor:
        """Feed one token per row; logits ``(rows, vocab)`` for the next one."""
        mask = None
        if self.pad is not None:  # mcore's convention: True = may not attend; (b, 1, 1, keys so far)
            mask = self.pad[:, None, None, :self.context.sequence_len_offset + 1]
        tokens_in = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (b, 1)
        return _logits(model, self.context, tokens_in, mask)
