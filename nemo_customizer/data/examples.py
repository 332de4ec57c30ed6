"""``TokenizedExample``: the unit every format tokenizes to and every later stage (batching, collate) consumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence: token ids and which of them are training targets."""

    input_ids: list[int]
    """``[n]`` token ids, BOS (if the tokenizer adds one) through the completion's EOS."""
    loss_mask: list[int]
    """``[n]``; ``loss_mask[i] == 1`` means token ``i`` is a target (a completion token, EOS included)."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask has {len(self.loss_mask)}")


PADDING_EXAMPLE = TokenizedExample(input_ids=[], loss_mask=[])
"""A row with no tokens: collate turns it into a fully masked row of padding (fills the last validation batch)."""
