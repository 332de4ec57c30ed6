"""Validation and normalization of preference rows: one prompt and two responses, the chosen and the rejected one.

Three layouts, told apart per row by the names of their response fields:

- NeMo Customizer's ``{"prompt", "chosen_response", "rejected_response"}``;
- TRL's ``{"prompt", "chosen", "rejected"}``; without ``"prompt"``, ``chosen`` and ``rejected`` are whole
  conversations and the messages they begin with in common are the prompt (TRL's implicit prompt);
- OpenAI's ``{"input": {"messages": [...], "tools": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``.

A prompt is text or chat messages (system, user, assistant and tool messages, ending with a user message or tool
results); a response is text or assistant messages (tool results between them allowed). A chat prompt's text
responses become one assistant message each; a text prompt needs text responses, since text is not rendered with the
chat template. Chat messages are checked with the chat format's rules (``chat_rows``), each problem naming the field
by its path in the row (``input.messages[2].content``, ``chosen[1].role``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from nemo_customizer.data.chat_rows import ROLES, message_problems, normalize_messages, tool_names, tools_problems
from nemo_customizer.data.jsonl import json_type_name, shown_keys, shown_value

Message = dict[str, Any]
Text = str
Messages = tuple[Message, ...]


@dataclass(frozen=True)
class Layout:
    """The field names of one preference row layout."""

    name: str
    prompt: str
    chosen: str
    rejected: str


NEMO = Layout("NeMo Customizer", "prompt", "chosen_response", "rejected_response")
TRL = Layout("TRL", "prompt", "chosen", "rejected")
OPENAI = Layout("OpenAI", "input", "preferred_output", "non_preferred_output")
LAYOUTS = (NEMO, TRL, OPENAI)
RESPONSE_KEYS = frozenset(key for layout in LAYOUTS for key in (layout.chosen, layout.rejected))


def is_preference_row(row: dict[str, Any]) -> bool:
    """True when ``row`` has a response field of any layout (how a preference file is detected)."""
    return not RESPONSE_KEYS.isdisjoint(row)


@dataclass(frozen=True)
class PreferenceParts:
    """A valid row, normalized: all text, or all messages (chat templates' form, as ``normalize_messages`` makes)."""

    prompt: Union[Text, Messages]
    chosen: Union[Text, Messages]
    rejected: Union[Text, Messages]
    tools: Optional[tuple[dict[str, Any], ...]]


@dataclass(frozen=True)
class _Response:
    """One response field of a row: its name, its value and the path of each of its messages."""

    key: str
    value: Any
    where: Callable[[int], str]


@dataclass(frozen=True)
class _Prompt:
    """A row's prompt field and tools, as found (not yet checked beyond their types)."""

    key: str
    """The field's path: ``prompt`` or ``input.messages``."""
    value: Any
    """Text or a list of messages; ``None`` for TRL's implicit prompt (or when ``problem`` is set)."""
    where: Callable[[int], str]
    """The path of message ``i`` of ``value``."""
    tools: Any = None
    tools_field: str = "tools"
    problem: Optional[str] = None


def preference_row_problems(row: dict[str, Any]) -> list[str]:
    """Every problem with a preference row; empty when it is valid. Keys a layout does not name are ignored."""
    return parse_preference_row(row)[1]


def parse_preference_row(row: dict[str, Any]) -> tuple[Optional[PreferenceParts], list[str]]:
    """``(parts, [])`` for a valid row, ``(None, problems)`` otherwise."""
    layouts = [layout for layout in LAYOUTS if layout.chosen in row or layout.rejected in row]
    if len(layouts) != 1:
        return None, [_layout_problem(row, layouts)]
    layout = layouts[0]
    problems = [p for key in (layout.chosen, layout.rejected) if (p := _response_problem(row, key))]
    prompt = _prompt(row, layout)
    problems += [prompt.problem] if prompt.problem else []
    if problems:  # the row's shape is wrong: messages about its contents would only repeat that
        return None, problems
    chosen = _Response(layout.chosen, row[layout.chosen], _index_path(layout.chosen))
    rejected = _Response(layout.rejected, row[layout.rejected], _index_path(layout.rejected))
    if prompt.value is None:  # TRL's implicit prompt: the messages both conversations begin with
        split = _split_implicit_prompt(chosen, rejected)
        if isinstance(split, str):
            return None, [split]
        messages, chosen, rejected = split
        prompt = dataclasses.replace(prompt, value=messages)
    if isinstance(prompt.value, str):
        return _text_parts(prompt, chosen, rejected)
    return _chat_parts(prompt, chosen, rejected)


def _layout_problem(row: dict[str, Any], layouts: list[Layout]) -> str:
    keys = shown_keys(row)
    if len(layouts) > 1:
        found = ", ".join(json.dumps(k) for layout in layouts for k in (layout.chosen, layout.rejected) if k in row)
        return (f"row mixes the response fields of the {layouts[0].name} and {layouts[1].name} layouts ({found}); "
                f"use one layout per row")
    if "completion" in row:
        return (f"row is prompt/completion data (keys found: {keys}) but this file's first row is preference data; "
                f"a file holds one format")
    names = ", ".join(f'"{layout.chosen}"/"{layout.rejected}"' for layout in LAYOUTS)
    return f"the responses are missing: the row has none of the fields {names} (keys found: {keys})"


def _response_problem(row: dict[str, Any], key: str) -> Optional[str]:
    if key not in row:
        return f'field "{key}" is missing (keys found: {shown_keys(row)})'
    return _text_or_list_problem(row[key], key, "a list of messages")


def _text_or_list_problem(value: Any, key: str, list_of: str) -> Optional[str]:
    if not isinstance(value, (str, list)):
        return f'field "{key}" must be a string or {list_of}, got {json_type_name(value)} (value {shown_value(value)})'
    if not (value.strip() if isinstance(value, str) else value):
        return f'field "{key}" is empty'
    return None


def _prompt(row: dict[str, Any], layout: Layout) -> _Prompt:
    if layout is OPENAI:
        value = row.get("input")
        if not isinstance(value, dict):
            shown = f"is missing (keys found: {shown_keys(row)})" if "input" not in row else \
                f"must be an object {{\"messages\": [...]}}, got {json_type_name(value)}"
            return _Prompt("input", None, _index_path("input"), problem=f'field "input" {shown}')
        return _Prompt("input.messages", value.get("messages"), _index_path("input.messages"), value.get("tools"),
                       "input.tools", _input_messages_problem(value))
    prompt = _Prompt("prompt", row.get("prompt"), _index_path("prompt"), row.get("tools"))
    if "prompt" in row:
        return dataclasses.replace(prompt, problem=_text_or_list_problem(prompt.value, "prompt",
                                                                         "a list of chat messages"))
    if layout is TRL and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return dataclasses.replace(prompt, where=_index_path("chosen"))  # the shared messages are chosen's first
    why = ('; without it, "chosen" and "rejected" must be conversations that begin with the same prompt messages'
           if layout is TRL else "")
    return dataclasses.replace(prompt, problem=f'field "prompt" is missing (keys found: {shown_keys(row)}){why}')


def _input_messages_problem(value: dict[str, Any]) -> Optional[str]:
    messages = value.get("messages")
    if "messages" not in value:
        return f'field "input.messages" is missing (keys found: {shown_keys(value)})'
    if not isinstance(messages, list):
        return f'field "input.messages" must be a list of message objects, got {json_type_name(messages)}'
    return None if messages else 'field "input.messages" is empty'


def _split_implicit_prompt(chosen: _Response, rejected: _Response) -> tuple[list, _Response, _Response] | str:
    """TRL's implicit prompt: ``(the messages both conversations begin with, the rest of each)``, or the problem."""
    a, b = chosen.value, rejected.value
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n == 0:
        return ('fields "chosen" and "rejected" have no prompt: without a "prompt" field, they must be conversations '
                'that begin with the same prompt messages')
    if a == b:
        return _same_responses(chosen.key, rejected.key)
    for response, other in ((chosen, rejected), (rejected, chosen)):
        if len(response.value) == n:
            return (f'field "{response.key}" has no messages after the {n} it begins with in common with '
                    f'"{other.key}" (the prompt), so it holds no response')
        first = response.value[n]
        role = first.get("role") if isinstance(first, dict) else None
        if role in ROLES and role != "assistant":
            return (f'fields "{chosen.key}" and "{rejected.key}" differ from message {n} on, where '
                    f'"{response.key}[{n}]" is a {role} message: the messages they begin with in common are the '
                    f'prompt, so each must go on with an assistant message')

    def split(r: _Response) -> _Response:
        return _Response(r.key, r.value[n:], lambda j: f"{r.key}[{n + j}]")

    return a[:n], split(chosen), split(rejected)


def _text_parts(prompt: _Prompt, chosen: _Response, rejected: _Response
                ) -> tuple[Optional[PreferenceParts], list[str]]:
    problems = [f'field "{prompt.key}" is text but field "{r.key}" is a list of messages; give the prompt as chat '
                f'messages too ([{{"role": "user", "content": ...}}]) or the responses as text'
                for r in (chosen, rejected) if isinstance(r.value, list)]
    if prompt.tools:
        problems.append(f'field "{prompt.tools_field}" needs a chat prompt (a list of messages): tools are rendered '
                        f'by the chat template')
    if not problems and chosen.value == rejected.value:
        problems.append(_same_responses(chosen.key, rejected.key))
    if problems:
        return None, problems
    return PreferenceParts(prompt.value, chosen.value, rejected.value, None), []


def _chat_parts(prompt: _Prompt, chosen: _Response, rejected: _Response
                ) -> tuple[Optional[PreferenceParts], list[str]]:
    messages = prompt.value
    problems = tools_problems(prompt.tools, prompt.tools_field)
    names = tool_names(prompt.tools)
    responses = [_as_messages(r) for r in (chosen, rejected)]
    for response in responses:
        def where(i: int, response: _Response = response) -> str:
            return prompt.where(i) if i < len(messages) else response.where(i - len(messages))

        problems += message_problems(messages + response.value, where, names)
        problems += _response_order_problems(response)
    problems += _prompt_end_problems(messages, prompt.where)
    problems = list(dict.fromkeys(problems))  # prompt problems were found once with each response
    if problems:
        return None, problems
    parts = PreferenceParts(normalize_messages(messages), normalize_messages(responses[0].value),
                            normalize_messages(responses[1].value), tuple(prompt.tools) if prompt.tools else None)
    if parts.chosen == parts.rejected:
        return None, [_same_responses(chosen.key, rejected.key)]
    return parts, []


def _as_messages(response: _Response) -> _Response:
    """A text response to a chat prompt as one assistant message (its path is the field itself)."""
    if isinstance(response.value, str):
        return _Response(response.key, [{"role": "assistant", "content": response.value}], lambda _: response.key)
    return response


def _response_order_problems(response: _Response) -> list[str]:
    """A response starts and ends with an assistant message and holds no user or system message."""
    problems = []
    for j, message in enumerate(response.value):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            continue  # message_problems names it
        if role in ("user", "system"):
            problems.append(f'field "{response.where(j)}.role" is "{role}" but a response holds only assistant '
                            f'messages (and tool results between them)')
        elif j == 0 and role != "assistant":
            problems.append(f'field "{response.where(j)}.role" is "{role}" but a response starts with an assistant '
                            f'message')
        elif j == len(response.value) - 1 and role != "assistant":
            problems.append(f'field "{response.where(j)}.role" is "{role}" but a response ends with an assistant '
                            f'message')
    return problems


def _prompt_end_problems(prompt: list, where: Callable[[int], str]) -> list[str]:
    last = prompt[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if role in ROLES and role not in ("user", "tool"):
        return [f'field "{where(len(prompt) - 1)}.role" is "{role}" but a prompt ends with a user message (or tool '
                f'results) for the responses to answer']
    return []


def _same_responses(chosen_key: str, rejected_key: str) -> str:
    return f'fields "{chosen_key}" and "{rejected_key}" are the same, so the pair prefers neither'


def _index_path(key: str) -> Callable[[int], str]:
    return lambda i: f"{key}[{i}]"
