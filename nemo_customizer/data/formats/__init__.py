"""Dataset formats. Each module builds one ``DataFormat``; ``FORMATS`` lists them."""

from __future__ import annotations

from typing import Any, Sequence

from nemo_customizer.data.formats.base import DataFormat
from nemo_customizer.data.formats.chat import CHAT, Conversation
from nemo_customizer.data.formats.preference import PREFERENCE, PreferenceExample
from nemo_customizer.data.formats.prompt_completion import PROMPT_COMPLETION, PromptCompletion

FORMATS: tuple[DataFormat, ...] = (CHAT, PREFERENCE, PROMPT_COMPLETION)
"""Every format. A file's format is detected from its first JSON object by ``shapes.detect_shape``, which also
recognizes other row shapes (Alpaca, ShareGPT) that convert to one of these."""


def format_of_examples(examples: Sequence[Any]) -> DataFormat:
    """The format that parsed ``examples`` (all must come from one format)."""
    types = {type(e) for e in examples}
    formats = [fmt for fmt in FORMATS if fmt.example_type in types]
    if len(types) != 1 or len(formats) != 1:
        names = ", ".join(sorted(t.__name__ for t in types)) or "none"
        raise ValueError(f"expected examples of one dataset format, got types: {names}")
    return formats[0]


__all__ = ["CHAT", "FORMATS", "PREFERENCE", "PROMPT_COMPLETION", "Conversation", "DataFormat", "PreferenceExample",
           "PromptCompletion", "format_of_examples"]
