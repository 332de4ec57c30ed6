"""``DataFormat``: what one dataset format (prompt/completion, chat, ...) contributes to the pipeline.

A format is a record of plain functions, so adding one is one new module that builds a ``DataFormat`` and one line in
``formats/__init__.py``; loading, splitting, batching and collate stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from nemo_customizer.data.examples import TokenizedExample, TokenizedPair
from nemo_customizer.data.truncation import TruncationStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Row = dict[str, Any]
Tokenize = Callable[[Sequence[Any], "PreTrainedTokenizerBase", int],
                    tuple[list[TokenizedExample] | list[TokenizedPair], TruncationStats]]


@dataclass(frozen=True)
class DataFormat:
    """One dataset format. Detected per file from its first JSON object."""

    name: str
    matches: Callable[[Row], bool]
    """True when a row looks like this format (checked in ``shapes.SHAPES`` order; the first match wins)."""
    row_hint: str
    """What a valid row looks like, as a sentence; ends every validation message about this format."""
    example_type: Optional[type] = None
    """The typed example this format parses rows into."""
    row_problems: Optional[Callable[[Row], list[str]]] = None
    """Everything wrong with one row, e.g. ``['field "prompt" is missing']``; empty when the row is valid."""
    build_example: Optional[Callable[[Row, str], Any]] = None
    """``(valid row, "path:line") -> example``."""
    tokenize: Optional[Tokenize] = None
    """``(examples, tokenizer, max_seq_length) -> (tokenized examples, truncation stats)``; preference data tokenizes
    to ``TokenizedPair``s."""
