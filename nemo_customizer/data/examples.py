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


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair: the prompt followed by the chosen response, and by the rejected one.

    Both sequences start with the same prompt tokens; each ``loss_mask`` covers only its response (the end-of-turn
    or EOS token included). Batches keep the two sequences of a pair together, chosen first.
    """

    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def length(self) -> int:
        """Tokens of both sequences (what the pair takes of a packed micro batch)."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)
