"""Chat rows ``{"messages": [...]}``: recognized so users get a clear message, not yet trainable.

A later release fills in ``row_problems``/``build_example``/``tokenize`` here (chat template, assistant-only loss
mask); nothing else in ``data/`` needs to change.
"""

from __future__ import annotations

from nemo_customizer.data.formats.base import DataFormat

CHAT = DataFormat(
    name="chat",
    matches=lambda row: "messages" in row,
    row_hint='Each line must be a JSON object {"messages": [{"role": str, "content": str}, ...]}.',
    unsupported=(
        'Chat data (rows with a "messages" key) arrives in a later release; for now, convert each row to '
        '{"prompt": str, "completion": str}.'
    ),
)
