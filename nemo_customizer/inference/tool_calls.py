"""Tool calls in generated text: which syntax a chat template teaches, and parsing it into OpenAI ``tool_calls``.

Pure functions on strings, no model. Four syntaxes are known:

- ``"hermes"`` (Qwen 2.5/3, Hermes, SmolLM3 ...): zero or more
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, possibly after some text.
- ``"llama3"`` (Llama 3.1-3.3 JSON tool calling): the whole turn is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``; several calls are separated by ``;``.
- ``"mistral"`` (Mistral 7B v0.3, Ministral 8B 2410, Mistral Nemo): ``[TOOL_CALLS]`` then a JSON list of
  ``{"name": ..., "arguments": {...}}``. Where ``[TOOL_CALLS]`` was decoded away as a special token, a list that
  ends the turn is read as the calls too.
- ``"mistral_args"`` (Mistral Small 3.2, Magistral, Devstral, Ministral 3): one ``[TOOL_CALLS]name[ARGS]{...}`` per
  call, back to back, possibly after some text (``[CALL_ID]id`` may sit before ``[ARGS]``). These markers are the
  only separators, so generated text keeps them (``CONTROL_TOKENS``).

Text that does not parse as calls of the syntax is returned as plain content: a model's malformed call is the
caller's to see, never an exception.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any, Dict, List, Optional, Tuple

TOOL_SYNTAXES = ("hermes", "llama3", "mistral", "mistral_args")
CONTROL_TOKENS = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
"""Special tokens that stay in decoded text (where the vocabulary has them): without them Mistral's calls cannot be
told from content, so OpenAI-compatible servers keep them too (vLLM decodes Mistral tool calls with special tokens)."""

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_TAG = "[TOOL_CALLS]"
_ARGS_TAG = "[ARGS]"
_CALL_ID_TAG = "[CALL_ID]"


def detect_tool_syntax(chat_template: Optional[str]) -> Optional[str]:
    """The tool-call syntax ``chat_template`` teaches the model: one of ``TOOL_SYNTAXES``, or None (unknown)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if _MISTRAL_TAG in chat_template:  # Mistral templates render past calls after it, newer ones with [ARGS]
        return "mistral_args" if _ARGS_TAG in chat_template else "mistral"
    # Llama 3.x templates tell the model 'Respond in the format {"name": function name, "parameters": ...}' and
    # render past calls after <|python_tag|> (3.1) or as that JSON object (3.2/3.3).
    if _PYTHON_TAG in chat_template or '"parameters"' in chat_template:
        return "llama3"
    return None


def parse_tool_calls(text: str, syntax: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Split generated ``text`` into ``(content, tool_calls)`` for ``syntax`` (one of ``TOOL_SYNTAXES``).

    ``tool_calls`` are OpenAI-style ``{"id": "call_…", "type": "function", "function": {"name", "arguments"}}``
    with ``arguments`` a JSON string; Mistral's ids are 9 letters and digits, the only ids its templates accept when
    the call comes back in the conversation. Without calls (nothing parsed, or a malformed call) the result is
    ``(text, [])``; with calls, ``content`` is the text outside them, or None when there is none.
    """
    if syntax == "hermes":
        calls, rest = _hermes(text)
    elif syntax == "llama3":
        calls, rest = _llama3(text), ""
    elif syntax == "mistral":
        calls, rest = _mistral(text)
    elif syntax == "mistral_args":
        calls, rest = _mistral_args(text)
    else:
        raise ValueError(f"unknown tool-call syntax {syntax!r}; known: {', '.join(TOOL_SYNTAXES)}")
    if not calls:
        return text, []
    return (rest.strip() or None), [_openai_call(name, arguments, syntax) for name, arguments in calls]


def _hermes(text: str) -> Tuple[Optional[List[Tuple[str, str]]], str]:
    """The calls of every ``<tool_call>`` block (None if there is none or one is malformed), and the rest."""
    blocks = _HERMES_BLOCK.findall(text)
    if not blocks:
        return None, text
    calls = [_call(_json_object(block.strip()), "arguments") for block in blocks]
    if any(call is None for call in calls):
        return None, text
    return calls, _HERMES_BLOCK.sub("", text)


def _llama3(text: str) -> Optional[List[Tuple[str, str]]]:
    """The calls when the whole turn is ``;``-separated call objects, else None."""
    body = text.strip()
    if body.startswith(_PYTHON_TAG):  # present only when special tokens were not skipped while decoding
        body = body[len(_PYTHON_TAG):]
    decoder = json.JSONDecoder()
    calls, at = [], 0
    while True:
        at = _skip_space(body, at)
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:
            return None
        call = _call(value, "parameters", "arguments")
        if call is None:
            return None
        calls.append(call)
        at = _skip_space(body, at)
        if at == len(body):
            return calls
        if body[at] != ";":
            return None
        at += 1


def _mistral(text: str) -> Tuple[Optional[List[Tuple[str, str]]], str]:
    """The calls of the JSON list after ``[TOOL_CALLS]`` (or, without the tag, a list that ends the turn), and the
    text before it; None if there is no such list or an element is not a call."""
    at = text.find(_MISTRAL_TAG)
    if at >= 0:
        before, body = text[:at], text[at + len(_MISTRAL_TAG):].strip()
    else:  # decoded without special tokens: the turn's last line is the list
        start = text.rfind("\n[") + 1 if text.rstrip().endswith("]") else -1
        if start < 0 or not text.strip():
            return None, text
        before, body = (text[:start], text[start:].strip()) if start > 0 else ("", text.strip())
    try:
        value = json.loads(body)
    except ValueError:
        return None, text
    if isinstance(value, dict):  # a single call object
        value = [value]
    if not isinstance(value, list) or not value:
        return None, text
    calls = [_call(item, "arguments") for item in value]
    if any(call is None for call in calls):
        return None, text
    return calls, before


def _mistral_args(text: str) -> Tuple[Optional[List[Tuple[str, str]]], str]:
    """The calls ``[TOOL_CALLS]name[ARGS]{...}`` from the first ``[TOOL_CALLS]`` to the end, and the text before it;
    None if any of them is not a name and one JSON object."""
    at = text.find(_MISTRAL_TAG)
    if at < 0:
        return None, text
    calls = []
    for chunk in text[at + len(_MISTRAL_TAG):].split(_MISTRAL_TAG):
        head, found, arguments = chunk.partition(_ARGS_TAG)
        name = head.partition(_CALL_ID_TAG)[0].strip()
        value = _json_object(arguments.strip())
        if not found or not name or any(c.isspace() for c in name) or value is None:
            return None, text
        calls.append(_call({"name": name, "arguments": value}, "arguments"))
    return calls, text[:at]


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _json_object(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _call(value: Any, *argument_keys: str) -> Optional[Tuple[str, str]]:
    """``(name, arguments as a JSON string)`` of one decoded call object, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    key = next((k for k in argument_keys if k in value), None)
    arguments = {} if key is None else value[key]
    if isinstance(arguments, str):  # already a JSON string (some models emit it so): keep it, never re-encode
        return (value["name"], arguments) if isinstance(_json_object(arguments), dict) else None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _openai_call(name: str, arguments: str, syntax: str) -> Dict[str, Any]:
    if syntax.startswith("mistral"):
        call_id = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    else:
        call_id = f"call_{secrets.token_hex(12)}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
