"""Chat rows ``{"messages": [...], "tools": [...]}`` (OpenAI format): validation, parsing, tokenization.

Rows are rendered with the model's chat template (``tokenizer.apply_chat_template``, tools included) and the loss is on
the assistant turns only: their content, tool calls as rendered, and end-of-turn token. The mask is derived from the
rendered text itself (``chat_masks``), so it works for templates without ``{% generation %}`` tags. Over-long rows lose
whole trailing turns (see ``chat_masks.truncate_chat``); a row that cannot be rendered is an error naming its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from nemo_customizer.data.chat_masks import ChatEncoder, ChatTemplateError, truncate_chat
from nemo_customizer.data.chat_rows import chat_row_problems, normalize_messages
from nemo_customizer.data.errors import IssueLog
from nemo_customizer.data.examples import TokenizedExample
from nemo_customizer.data.formats.base import DataFormat, Row
from nemo_customizer.data.truncation import TruncationStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_HINT = ("Fix the row, or set model.chat_template to a chat template that renders it (tools need a template "
                 "that supports them, such as Llama 3.1's or Qwen2.5's).")


@dataclass(frozen=True)
class Conversation:
    """One validated chat row, normalized for chat templates (tool-call arguments are JSON objects)."""

    messages: tuple[dict[str, Any], ...]
    """OpenAI-style messages; the last one is from the assistant."""
    tools: Optional[tuple[dict[str, Any], ...]]
    """``{"type": "function", "function": {...}}`` tool schemas, or ``None``."""
    origin: str
    """``path:line`` the row came from."""


def build_example(row: Row, origin: str) -> Conversation:
    tools = tuple(row["tools"]) if row.get("tools") else None
    return Conversation(messages=normalize_messages(row["messages"]), tools=tools, origin=origin)


def tokenize(
    examples: Sequence[Conversation], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> tuple[list[TokenizedExample], TruncationStats]:
    """Render each conversation with the chat template; loss on assistant turns only (see ``chat_masks``).

    Rows the template cannot render (tools on a template without tool support, a template ``raise_exception``) are
    collected and raised as one ``DatasetError`` naming each row's file:line. Over-long rows are truncated or dropped
    by ``truncate_chat``; the stats count them.
    """
    encoder = ChatEncoder(tokenizer)
    issues = IssueLog()
    stats = TruncationStats()
    tokenized = []
    for example in examples:
        try:
            result, outcome = truncate_chat(encoder, example.messages, example.tools, max_seq_length)
        except ChatTemplateError as e:
            issues.add(example.origin, str(e), TEMPLATE_HINT)
            continue
        if result is None:
            stats.dropped += 1
            stats.dropped_origins.append(example.origin)
            continue
        if outcome == "truncated":
            stats.truncated += 1
        else:
            stats.unchanged += 1
        tokenized.append(result)
    issues.raise_if_any()
    return tokenized, stats


CHAT = DataFormat(
    name="chat",
    matches=lambda row: "messages" in row,
    row_hint=('Each line must be a JSON object {"messages": [{"role": "system"|"user"|"assistant"|"tool", '
              '"content": str}, ...], "tools": [...]} (OpenAI chat format) ending with an assistant message.'),
    example_type=Conversation,
    row_problems=chat_row_problems,
    build_example=build_example,
    tokenize=tokenize,
)
