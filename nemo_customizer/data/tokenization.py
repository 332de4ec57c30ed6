"""``tokenize_examples``: validated examples of any format -> ``TokenizedExample``s (preference data:
``TokenizedPair``s) with loss masks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nemo_customizer.data.examples import TokenizedExample, TokenizedPair
from nemo_customizer.data.formats import format_of_examples
from nemo_customizer.data.truncation import TruncationStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_examples(
    examples: Sequence[Any], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> tuple[list[TokenizedExample] | list[TokenizedPair], TruncationStats]:
    """Tokenize ``examples`` (all of one format) with their format's rules; no sequence exceeds ``max_seq_length``.

    Preference examples give one ``TokenizedPair`` per kept row (both of its sequences within ``max_seq_length``);
    the stats then count pairs.

    ``max_seq_length`` bounds ``len(input_ids)`` (BOS and EOS included); after collate's shift the model sees at most
    ``max_seq_length - 1`` positions. Over-long rows are truncated or dropped by the format's rule; the returned stats
    count them so the job log can state them. Output order follows input order, minus dropped rows.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    if not examples:
        return [], TruncationStats()
    return format_of_examples(examples).tokenize(examples, tokenizer, max_seq_length)
