"""Choosing the next token and finding stop strings: pure functions, no model and no megatron."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def next_token(logits: torch.Tensor, *, temperature: float, top_p: float,
               generator: Optional[torch.Generator]) -> int:
    """The next token id from one position's logits ``(vocab,)``.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the temperature and the token is
    drawn from the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling; the
    most likely token is always kept), using ``generator`` so a seed reproduces the draw.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be 0 or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)  # (vocab,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens before it already reach top_p; the first token is never dropped
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest stop string starts in ``text``, or None (the completion is cut there)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string: text a stream must hold back,
    since the next tokens may complete the stop string (and the completion is cut before it)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
