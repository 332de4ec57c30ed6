"""Chat generation pieces around the completion engine: render a conversation with the model's chat template, find
the template's end-of-turn token, and turn a completion into an OpenAI-style assistant message.

Reasoning: where the template teaches ``<think>`` blocks (Qwen3, Llama-Nemotron v1), a reply that opens with
``<think>`` has the text up to ``</think>`` returned as ``reasoning_content`` and the rest as ``content``, as vLLM's
reasoning parsers do; a reply cut inside its reasoning has only ``reasoning_content``.

No model here: ``Generator.chat`` renders with :class:`ChatTemplate`, completes the token ids with the usual
KV-cache path (stopping at ``ChatTemplate.end_of_turn_ids`` too), and builds the reply with :func:`chat_completion`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jinja2 import TemplateError

from nemo_customizer.data.chat_masks import end_of_turn_token
from nemo_customizer.data.chat_rows import normalize_messages
from nemo_customizer.inference.sampling import stop_prefix_length
from nemo_customizer.inference.tool_calls import TOOL_SYNTAXES, detect_tool_syntax, parse_tool_calls

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ChatCompletion:
    """One generated assistant turn, OpenAI-style."""

    message: Dict[str, Any]
    """``{"role": "assistant", "content": str | None}`` plus ``"reasoning_content"`` when the reply opened with a
    ``<think>`` block the template teaches, and ``"tool_calls"`` when the model called tools (each
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

    ``tool_syntax`` overrides the syntax detected from the template text: one of ``tool_calls.TOOL_SYNTAXES``
    (``"hermes"``, ``"llama3"``, ``"mistral"``, ``"mistral_args"``), or ``"none"`` (tool calls are left in the
    content as text).
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
        self.reasoning = THINK_CLOSE in tokenizer.get_chat_template()  # it teaches <think>...</think> blocks

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
            raise ValueError("the chat template renders tools, but its tool-call syntax is not one we parse; pass "
                             f"tool_syntax (one of {', '.join(map(repr, TOOL_SYNTAXES))}), or tool_syntax='none' to "
                             "get the calls as plain text")


def chat_completion(completion, *, tool_syntax: Optional[str], reasoning: bool = False) -> ChatCompletion:
    """The assistant turn of a :class:`~nemo_customizer.inference.Completion`; tool calls parsed with
    ``tool_syntax`` (None or ``"none"``: the text is the content), and with ``reasoning`` (the template teaches
    ``<think>`` blocks) an opening ``<think>`` block split off as ``reasoning_content``."""
    text = completion.text
    message: Dict[str, Any] = {"role": "assistant", "content": text}
    thought = split_reasoning(text) if reasoning else None
    if thought is not None:
        reasoning_content, text = thought
        message = {"role": "assistant", "content": text or None, "reasoning_content": reasoning_content}
    finish_reason = completion.finish_reason
    if tool_syntax in TOOL_SYNTAXES:
        content, calls = parse_tool_calls(text, tool_syntax)
        if calls:
            message.update(content=content, tool_calls=calls)
            if finish_reason == "stop":
                finish_reason = "tool_calls"
    return ChatCompletion(message=message, finish_reason=finish_reason, prompt_tokens=completion.prompt_tokens,
                          completion_tokens=completion.completion_tokens, token_ids=list(completion.token_ids))


def split_reasoning(text: str, *, partial: bool = False) -> Optional[Tuple[str, str]]:
    """``(reasoning, content)`` of a reply that opens with ``<think>``: the text up to ``</think>`` (stripped) and
    the text after it (leading whitespace dropped; "" when the reply ended inside its reasoning). None for a reply
    that does not open with ``<think>``. ``partial``: the reply is still growing, so a tail that may become
    ``</think>`` is held back; what is returned then only ever grows."""
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        return None
    reasoning, closed, content = body[len(THINK_OPEN):].partition(THINK_CLOSE)
    if partial and not closed:
        reasoning = reasoning[:len(reasoning) - stop_prefix_length(reasoning, [THINK_CLOSE])]
    return reasoning.strip(), content.lstrip()


class ReasoningStream:
    """A streamed reply split into ``reasoning_content`` and ``content`` deltas as :func:`split_reasoning` splits
    the whole; their concatenations equal the non-streamed message's fields."""

    def __init__(self):
        self.text = ""
        self.sent = {"reasoning_content": "", "content": ""}

    def push(self, delta: str, *, final: bool) -> Dict[str, str]:
        """The new parts of each field once ``delta`` is appended (``final``: the reply is complete)."""
        self.text += delta
        if not final and THINK_OPEN.startswith(self.text.lstrip()):
            return {}  # too early to tell a reasoning reply from a plain one
        thought = split_reasoning(self.text, partial=not final)
        fields = dict(zip(("reasoning_content", "content"), thought)) if thought else {"content": self.text}
        out = {}
        for key, value in fields.items():
            if value.startswith(self.sent[key]) and len(value) > len(self.sent[key]):
                out[key] = value[len(self.sent[key]):]
                self.sent[key] = value
        return out


def _template_messages(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Messages as templates expect them: the same normalization training applies to chat rows."""
    try:
        return list(normalize_messages(list(messages)))
    except (KeyError, TypeError, ValueError) as exc:  # unvalidated client input: bad tool call or arguments JSON
        raise ValueError(f"messages are not valid OpenAI chat messages: a tool call's function needs a name, and "
                         f"its arguments is not valid JSON or not an object ({exc})") from exc


def _end_of_turn_ids(tokenizer) -> frozenset:
    """The added token that closes an assistant turn in this template (``<|im_end|>``, ``<|eot_id|>``, ...), plus
    Llama 3's ``<|eom_id|>`` (the end of a tool-calling turn) when the vocabulary has it."""
    ids = set()
    end_of_turn = end_of_turn_token(tokenizer)
    if end_of_turn is not None:
        ids.add(tokenizer.convert_tokens_to_ids(end_of_turn))
    vocab = tokenizer.get_vocab()
    if "<|eom_id|>" in vocab:
        ids.add(vocab["<|eom_id|>"])
    return frozenset(ids)
