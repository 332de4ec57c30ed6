"""The truncation rule for prompt/completion rows (prompt tokens go from the left), as a pure function on token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_customizer.data.examples import TokenizedExample


@dataclass
class TruncationStats:
    """How many rows fit as-is, lost the start of their prompt, or were dropped; stated in the job log."""

    unchanged: int = 0
    truncated: int = 0
    """Kept, with prompt tokens removed from the left."""
    dropped: int = 0
    """Removed: the completion (+ BOS) alone is longer than ``max_seq_length``."""
    dropped_origins: list[str] = field(default_factory=list)
    """``path:line`` of each dropped row, so users can find them."""

    @property
    def kept(self) -> int:
        return self.unchanged + self.truncated

    def describe(self) -> str:
        return f"{self.kept} examples kept ({self.truncated} truncated), {self.dropped} dropped"


def truncate_prompt_left(
    prompt_ids: list[int], completion_ids: list[int], max_seq_length: int, num_leading_special: int
) -> Optional[TokenizedExample]:
    """Join prompt and completion ids into one example no longer than ``max_seq_length`` tokens.

    Over-long rows lose prompt tokens from the left, so the end of the prompt stays next to the completion; the first
    ``num_leading_special`` prompt tokens (a BOS the tokenizer added) are always kept. Returns ``None`` when the
    completion plus those tokens alone do not fit: a row cannot be trained on without its full completion.
    """
    head, body = prompt_ids[:num_leading_special], prompt_ids[num_leading_special:]
    room = max_seq_length - len(head) - len(completion_ids)
    if room < 0:
        return None
    # body[-room:] would keep the whole body when room == 0, so slice from an explicit start.
    body = body[max(len(body) - room, 0):]
    prompt = head + body
    return TokenizedExample(
        input_ids=prompt + completion_ids,
        loss_mask=[0] * len(prompt) + [1] * len(completion_ids),
    )
