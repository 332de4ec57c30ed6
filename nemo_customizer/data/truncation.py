"""The truncation rule for prompt/completion rows and preference pairs (prompt tokens go from the left), as pure
functions on token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_customizer.data.examples import TokenizedExample, TokenizedPair


@dataclass
class TruncationStats:
    """How many rows (preference data: pairs) fit as-is, lost the start of their prompt, or were dropped; stated in the
    job log."""

    unchanged: int = 0
    truncated: int = 0
    """Kept, with prompt tokens removed from the left."""
    dropped: int = 0
    """Removed: the completion (+ BOS) alone is longer than ``max_seq_length``."""
    dropped_origins: list[str] = field(default_factory=list)
    """``path:line`` of each dropped row, so users can find them."""
    unit: str = "examples"
    """What a row is called in the log: ``examples``, or ``pairs`` for preference data."""

    @property
    def kept(self) -> int:
        return self.unchanged + self.truncated

    def describe(self) -> str:
        return f"{self.kept} {self.unit} kept ({self.truncated} truncated), {self.dropped} dropped"


def truncate_prompt_left(
    prompt_ids: list[int], completion_ids: list[int], max_seq_length: int, num_leading_special: int
) -> Optional[TokenizedExample]:
    """Join prompt and completion ids into one example no longer than ``max_seq_length`` tokens.

    Over-long rows lose prompt tokens from the left, so the end of the prompt stays next to the completion; the first
    ``num_leading_special`` prompt tokens (a BOS the tokenizer added) are always kept. Returns ``None`` when the
    completion plus those tokens alone do not fit: a row cannot be trained on without its full completion.
    """
    prompt = kept_prompt(prompt_ids, len(completion_ids), max_seq_length, num_leading_special)
    return None if prompt is None else _joined(prompt, completion_ids)


def truncate_pair_prompt_left(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_seq_length: int,
    num_leading_special: int,
) -> Optional[TokenizedPair]:
    """A preference pair whose two sequences (prompt + chosen, prompt + rejected) each fit ``max_seq_length`` tokens.

    The rule of ``truncate_prompt_left``, applied once for the longer response so both sequences keep the same
    prompt tokens. Returns ``None`` when the longer response plus the first ``num_leading_special`` prompt tokens does
    not fit: a pair cannot be trained on without both of its full responses.
    """
    prompt = kept_prompt(prompt_ids, max(len(chosen_ids), len(rejected_ids)), max_seq_length, num_leading_special)
    if prompt is None:
        return None
    return TokenizedPair(chosen=_joined(prompt, chosen_ids), rejected=_joined(prompt, rejected_ids))


def kept_prompt(prompt_ids: list[int], response_length: int, max_seq_length: int,
                num_leading_special: int) -> Optional[list[int]]:
    """The prompt tokens that fit before a response of ``response_length`` tokens: its first ``num_leading_special``
    tokens and as many of its last tokens as there is room for; ``None`` when not even the first ones fit."""
    head, body = prompt_ids[:num_leading_special], prompt_ids[num_leading_special:]
    room = max_seq_length - len(head) - response_length
    if room < 0:
        return None
    # body[-room:] would keep the whole body when room == 0, so slice from an explicit start.
    return head + body[max(len(body) - room, 0):]


def _joined(prompt: list[int], response: list[int]) -> TokenizedExample:
    """``prompt + response`` with the loss on the response."""
    return TokenizedExample(input_ids=prompt + response, loss_mask=[0] * len(prompt) + [1] * len(response))
