"""Validation and normalization of OpenAI-style chat rows ``{"messages": [...], "tools": [...]}``.

Every problem names the field by its path (``messages[3].tool_calls[0].function.arguments``) so users can find it.
Normalization makes rows what Hugging Face chat templates expect: tool-call ``arguments`` become JSON objects, because
the templates (Llama 3.1, Qwen, Hermes) serialize them with ``tojson`` themselves; a JSON string would be encoded twice.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from nemo_customizer.data.jsonl import JsonValueError, json_type_name, parse_json, shown_keys, shown_value

ROLES = ("system", "user", "assistant", "tool")
MAX_SHOWN_NAMES = 8
Message = dict[str, Any]


def chat_row_problems(row: dict[str, Any]) -> list[str]:
    """Every problem with a chat row; empty when it is valid. Keys other than ``messages``/``tools`` are ignored."""
    if "messages" not in row:
        keys = shown_keys(row)
        if "prompt" in row or "completion" in row:
            return [f"row is prompt/completion data (keys found: {keys}) but this file's first row is chat data; "
                    f"a file holds one format"]
        return [f'field "messages" is missing (keys found: {keys})']
    problems = tools_problems(row.get("tools"))
    messages = row["messages"]
    if not isinstance(messages, list):
        return problems + [f'field "messages" must be a list of message objects, got {json_type_name(messages)}']
    if not messages:
        return problems + ['field "messages" is empty']
    problems += message_problems(messages, lambda i: f"messages[{i}]", tool_names(row.get("tools")))
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in ROLES and last["role"] != "assistant":
        problems.append(f'field "messages[{len(messages) - 1}].role" is "{last["role"]}" but the last message must '
                        f'be an assistant message (the turn to train on)')
    return problems


def message_problems(messages: list[Any], where: Callable[[int], str], tool_names: Optional[set[str]]) -> list[str]:
    """Every problem with the messages of one conversation, in order; ``where(i)`` is message ``i``'s field path.

    Checks each message (role, content, tool calls against ``tool_names`` when the row declares tools) and the
    order: an optional system message first, then a user message before any assistant or tool message, and each tool
    message answering the tool calls of the assistant message before it. Whether the conversation may end where it
    does is the caller's rule.
    """
    problems = []
    open_call_ids: Optional[set[str]] = None  # ids of the latest assistant tool calls; None: no call to answer
    seen_user = False
    for i, message in enumerate(messages):
        at = where(i)
        if not isinstance(message, dict):
            problems.append(f'field "{at}" must be an object, got {json_type_name(message)}')
            continue
        role = message.get("role")
        if role not in ROLES:
            shown = "missing" if "role" not in message else f"got {shown_value(role)}"
            problems.append(f'field "{at}.role" must be one of {", ".join(map(json.dumps, ROLES))} ({shown})')
            seen_user = True  # whatever it was meant to be, do not also blame the order of the messages after it
            continue
        if role == "system" and i > 0:
            problems.append(f'field "{at}.role" is "system" but only the first message may be a system message')
        if role in ("assistant", "tool") and not seen_user:
            problems.append(f'field "{at}.role" is "{role}" but the conversation must start with a user message '
                            f'(after an optional system message)')
        seen_user = seen_user or role == "user"
        problems += _content_problems(message, at, role)
        if "tool_calls" in message and role != "assistant" and message["tool_calls"] is not None:
            problems.append(f'field "{at}.tool_calls" is only allowed on assistant messages')
        if role == "assistant":
            calls = message.get("tool_calls")
            problems += _tool_calls_problems(calls, at, tool_names)
            open_call_ids = _call_ids(calls) if calls else None
        elif role == "tool":
            problems += _tool_message_problems(message, at, open_call_ids)
        else:
            open_call_ids = None
    return problems


def normalize_messages(messages: list[Message]) -> tuple[Message, ...]:
    """Copies of valid ``messages`` as templates expect them.

    Tool-call ``arguments`` strings are parsed into objects; ``"type": "function"`` is filled in on tool calls; an
    empty or null ``tool_calls`` and a null ``content`` are removed (templates test ``'tool_calls' in message`` and
    would render a null content as the text ``None``).
    """
    out = []
    for message in messages:
        message = dict(message)
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
        else:
            message["tool_calls"] = [_normalized_call(call) for call in message["tool_calls"]]
        if message.get("content", "") is None:
            del message["content"]
        out.append(message)
    return tuple(out)


def _normalized_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call["function"])
    if isinstance(function["arguments"], str):
        function["arguments"] = parse_json(function["arguments"])
    return {**call, "type": call.get("type", "function"), "function": function}


def _content_problems(message: Message, where: str, role: str) -> list[str]:
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls"):
        if content is not None and not isinstance(content, str):
            return [f'field "{where}.content" must be a string or null, got {json_type_name(content)}']
        return []
    if "content" not in message:
        return [f'field "{where}.content" is missing']
    if not isinstance(content, str):
        allowed = " (null is allowed only on assistant messages with tool_calls)" if content is None else ""
        return [f'field "{where}.content" must be a string, got {json_type_name(content)}{allowed}']
    if role in ("user", "assistant") and not content.strip():
        return [f'field "{where}.content" is empty']
    return []


def _tool_calls_problems(calls: Any, where: str, tool_names: Optional[set[str]]) -> list[str]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        return [f'field "{where}.tool_calls" must be a list, got {json_type_name(calls)}']
    problems = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            problems.append(f'field "{at}" must be an object, got {json_type_name(call)}')
            continue
        if call.get("type", "function") != "function":
            problems.append(f'field "{at}.type" must be "function", got {shown_value(call["type"])}')
        if "id" in call and not isinstance(call["id"], str):
            problems.append(f'field "{at}.id" must be a string, got {json_type_name(call["id"])}')
        function = call.get("function")
        if not isinstance(function, dict):
            shown = "is missing" if "function" not in call else f"must be an object, got {json_type_name(function)}"
            problems.append(f'field "{at}.function" {shown}')
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f'field "{at}.function.name" must be a non-empty string, got {shown_value(name)}')
        elif tool_names is not None and name not in tool_names:
            problems.append(f'field "{at}.function.name" is {shown_value(name)}, which is not one of the row\'s '
                            f'tools ({_shown_names(tool_names) or "none"})')
        problems += _arguments_problems(function, f"{at}.function.arguments")
    return problems


def _arguments_problems(function: dict[str, Any], at: str) -> list[str]:
    if "arguments" not in function:
        return [f'field "{at}" is missing']
    arguments = function["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = parse_json(arguments)
        except JsonValueError as e:
            return [f'field "{at}" is a string but not valid JSON: {str(e).removeprefix("invalid JSON: ")}']
    if not isinstance(arguments, dict):
        return [f'field "{at}" must be a JSON object (or a string holding one), got {json_type_name(arguments)}']
    return []


def _tool_message_problems(message: Message, where: str, open_call_ids: Optional[set[str]]) -> list[str]:
    if open_call_ids is None:
        return [f'field "{where}.role" is "tool" but it does not follow an assistant message with tool_calls']
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        return [f'field "{where}.tool_call_id" must be a string, got {json_type_name(call_id)}']
    ids = _shown_names(open_call_ids)
    if call_id is None and open_call_ids:
        return [f'field "{where}.tool_call_id" is missing; the tool calls it answers have ids {ids}']
    if call_id is not None and call_id not in open_call_ids:
        known = f"ids {ids}" if open_call_ids else "no ids"
        return [f'field "{where}.tool_call_id" is {shown_value(call_id)}, which answers no earlier tool call '
                f'(the preceding tool calls have {known})']
    return []


def tools_problems(tools: Any, field: str = "tools") -> list[str]:
    """Every problem with a row's tool schemas (``None`` is no tools); ``field`` is their path in the row."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [f'field "{field}" must be a list of tool objects, got {json_type_name(tools)}']
    problems = []
    for k, tool in enumerate(tools):
        at = f"{field}[{k}]"
        if not isinstance(tool, dict):
            problems.append(f'field "{at}" must be an object, got {json_type_name(tool)}')
            continue
        if tool.get("type") != "function":
            problems.append(f'field "{at}.type" must be "function", got '
                            f'{"nothing" if "type" not in tool else shown_value(tool["type"])}')
        function = tool.get("function")
        if not isinstance(function, dict):
            shown = "is missing" if "function" not in tool else f"must be an object, got {json_type_name(function)}"
            problems.append(f'field "{at}.function" {shown}')
            continue
        if not isinstance(function.get("name"), str) or not function["name"]:
            name = shown_value(function.get("name"))
            problems.append(f'field "{at}.function.name" must be a non-empty string, got {name}')
        if "description" in function and not isinstance(function["description"], str):
            problems.append(f'field "{at}.function.description" must be a string, '
                            f'got {json_type_name(function["description"])}')
        parameters = function.get("parameters")
        if "parameters" in function and not isinstance(parameters, dict):
            problems.append(f'field "{at}.function.parameters" must be a JSON schema object, '
                            f'got {json_type_name(parameters)}')
        elif isinstance(parameters, dict) and not isinstance(parameters.get("properties", {}), dict):
            problems.append(f'field "{at}.function.parameters.properties" must be an object, '
                            f'got {json_type_name(parameters["properties"])}')
    return problems


def tool_names(tools: Any) -> Optional[set[str]]:
    """Names of the row's well-formed tools; ``None`` when the row declares no tools (calls are not checked then)."""
    if not isinstance(tools, list) or not tools:
        return None
    functions = [t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    return {f["name"] for f in functions if isinstance(f.get("name"), str)}


def _call_ids(calls: Any) -> set[str]:
    if not isinstance(calls, list):
        return set()
    return {c["id"] for c in calls if isinstance(c, dict) and isinstance(c.get("id"), str)}


def _shown_names(names: set[str]) -> str:
    shown = [shown_value(n) for n in sorted(names)[:MAX_SHOWN_NAMES]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > MAX_SHOWN_NAMES else "")
