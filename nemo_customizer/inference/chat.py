"""Chat generation pieces around the completion engine: render a conversation with the model's chat template, find
the template's end-of-turn token, and turn a completion into an OpenAI-style assistant message.

No model here: ``Generator.chat`` renders with :class:`ChatTemplate`, completes the token ids with the usual
KV-cache path (stopping at ``ChatTemplate.end_of_turn_ids`` too), and builds the reply with :func:`chat_completion`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence

from jinja2 import TemplateError

from nemo_customizer.data.chat_rows import normalize_messages
from nemo_customizer.inference.tool_calls import TOOL_SYNTAXES, detect_tool_syntax, parse_tool_calls

_SENTINEL = "Zq7Sentinel"  # assistant content to locate in a rendered turn; no whitespace, so `| trim` keeps it


@dataclasses.dataclass(frozen=True)
class ChatCompletion:
    """One generated assistant turn, OpenAI-style."""

    message: Dict[str, Any]
    """``{"role": "assistant", "content": str | None}`` plus ``"tool_calls"`` when the model called tools (each
    ``{"id": "call_…", "type": "function", "function": {"name", "arguments"}}``, ``arguments`` a JSON string)."""
    finish_reason: str
    """``"tool_calls"`` (the turn ended with parsed tool calls), ``"stop"`` (end of turn or a stop string) or
    ``"length"`` (``max_tokens`` or the model's context was reached)."""
    prompt_tokens: int
    """Tokens of the rendered conversation."""
    completion_tokens: int
    """Generated tokens, including the end-of-turn token."""
    token_ids: List[int]
    """Every generated token id."""

    @property
    def usage(self) -> Dict[str, int]:
        """OpenAI ``usage``: prompt, completion and total token counts."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ChatTemplate:
    """A tokenizer's chat template: rendering, its end-of-turn tokens and its tool-call syntax.

    ``tool_syntax`` overrides the syntax detected from the template text: ``"hermes"``, ``"llama3"``,
    ``"mistral"``, or ``"none"`` (tool calls are left in the content as text).
    """

    def __init__(self, tokenizer, tool_syntax: Optional[str] = None):
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template, so it cannot render messages; set "
                             "model.chat_template to the model's Jinja chat template, or pass a prompt instead")
        if tool_syntax is not None and tool_syntax not in (*TOOL_SYNTAXES, "none"):
            raise ValueError(f"tool_syntax must be one of {', '.join(TOOL_SYNTAXES)} or 'none', got {tool_syntax!r}")
        self.tokenizer = tokenizer
        # tools=[] picks a tokenizer's "tool_use" template when it has several (Hermes 2 Pro, Command R)
        self.tool_syntax = tool_syntax or detect_tool_syntax(tokenizer.get_chat_template(tools=[]))
        self.end_of_turn_ids = _end_of_turn_ids(tokenizer)

    def render(self, messages: Sequence[Dict[str, Any]], tools: Optional[Sequence[Dict[str, Any]]] = None) -> List[int]:
        """Token ids of ``messages`` (+ ``tools``) followed by the assistant generation prompt.

        The same ids as ``apply_chat_template(..., tokenize=True)``: the template writes its own special tokens (BOS
        etc.), so none are added on top. Messages are normalized as for training: tool-call ``arguments`` given as
        JSON strings (as OpenAI returns them) are decoded, since templates encode them with ``tojson``; a null
        ``content`` and empty ``tool_calls`` are dropped.
        """
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        tools = list(tools) if tools else None
        if tools:
            self._check_tools(tools)
        try:
            text = self.tokenizer.apply_chat_template(_template_messages(messages), tools=tools,
                                                      add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # includes raise_exception() in templates
            raise ValueError(f"the chat template could not render these messages: {exc}") from exc
        if tools:  # the rule training applies: a template that drops a tool cannot offer it
            missing = [tool["function"]["name"] for tool in tools if tool["function"]["name"] not in text]
            if missing:
                raise ValueError(f"the chat template cannot render tools: tool {missing[0]!r} does not appear in the "
                                 "rendered conversation")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_tools(self, tools: List[Dict[str, Any]]) -> None:
        """Raise unless ``tools`` are OpenAI function specs, the template renders them, and its call syntax is known."""
        for k, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ..., "
                                 f"'parameters': ...}}}}, got {tool!r}")
        if not re.search(r"\btools\b", self.tokenizer.get_chat_template(tools=tools)):
            raise ValueError("the chat template cannot render tools (it never refers to `tools`), so this model "
                             "cannot be offered tools; call it without tools, or set model.chat_template to a "
                             "template with a tool-calling format")
        if self.tool_syntax is None:
            raise ValueError("the chat template renders tools, but its tool-call syntax is not one we parse "
                             f"({', '.join(TOOL_SYNTAXES)}); pass tool_syntax='hermes', 'llama3' or "
                             "'mistral', or tool_syntax='none' to get the calls as plain text")


def chat_completion(completion, *, tool_syntax: Optional[str]) -> ChatCompletion:
    """The assistant turn of a :class:`~nemo_customizer.inference.Completion`; tool calls parsed with
    ``tool_syntax`` (None or ``"none"``: the text is the content)."""
    message: Dict[str, Any] = {"role": "assistant", "content": completion.text}
    finish_reason = completion.finish_reason
    if tool_syntax in TOOL_SYNTAXES:
        content, calls = parse_tool_calls(completion.text, tool_syntax)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            if finish_reason == "stop":
                finish_reason = "tool_calls"
    return ChatCompletion(message=message, finish_reason=finish_reason, prompt_tokens=completion.prompt_tokens,
                          completion_tokens=completion.completion_tokens, token_ids=list(completion.token_ids))


def _template_messages(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Messages as templates expect them: the same normalization training applies to chat rows."""
    try:
        return list(normalize_messages(list(messages)))
    except (KeyError, TypeError, ValueError) as exc:  # unvalidated client input: bad tool call or arguments JSON
        raise ValueError(f"messages are not valid OpenAI chat messages: a tool call's function needs a name, and "
                         f"its arguments is not valid JSON or not an object ({exc})") from exc


def _end_of_turn_ids(tokenizer) -> frozenset:
    """The added token that closes an assistant turn in this template (``<|im_end|>``, ``<|eot_id|>``, ...), plus
    Llama 3's ``<|eom_id|>`` (the end of a tool-calling turn) when the vocabulary has it.

    Found by rendering a short conversation and reading the token right after the assistant's content.
    """
    ids = set()
    added = set(tokenizer.added_tokens_decoder)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # jinja errors, raise_exception() on this probe conversation: the eos ids alone end a turn
        text = ""
    if _SENTINEL in text:
        after = tokenizer(text[text.rindex(_SENTINEL) + len(_SENTINEL):], add_special_tokens=False)["input_ids"]
        if after and after[0] in added:
            ids.add(after[0])
    vocab = tokenizer.get_vocab()
    if "<|eom_id|>" in vocab:
        ids.add(vocab["<|eom_id|>"])
    return frozenset(ids)
