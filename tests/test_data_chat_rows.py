"""Chat rows: loading, validation (every error names file:line and the field path), normalization, mixed files."""

import json
from pathlib import Path

import pytest

from nemo_customizer.data import DatasetError, load_dataset
from nemo_customizer.data.formats import Conversation

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(arguments, name="get_weather", **extra):
    return {**extra, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_row(arguments='{"city": "Paris"}'):
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call(arguments, id="call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "content": "18C in Paris."},
    ], "tools": [WEATHER_TOOL]}


def write(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(path, val_fraction=0.0)
    return str(info.value)


def test_valid_chat_rows_load_normalized(tmp_path):
    f = write(tmp_path / "train.jsonl", tool_row(), tool_row(arguments={"city": "Paris"}),
              {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}], "id": 3})
    splits = load_dataset(f, val_fraction=0.0)
    assert splits.format == "chat" and len(splits.train) == 3
    from_string, from_object, plain = splits.train
    assert isinstance(from_string, Conversation) and from_string.origin == f"{f}:1"
    # A JSON-string argument becomes the object templates serialize themselves (never encoded twice); a null
    # content next to tool_calls is removed (templates would print it as "None").
    assert from_string.messages[2] == {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert from_string.messages == from_object.messages and from_string.tools == (WEATHER_TOOL,)
    assert plain.tools is None and plain.messages[-1] == {"role": "assistant", "content": "Hello!"}


def msgs(*messages, **row):
    return {"messages": list(messages), **row}


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize("row, expected", [
    ({"message": []}, 'field "messages" is missing (keys found: "message")'),
    ({"messages": "hi"}, 'field "messages" must be a list of message objects, got str'),
    ({"messages": []}, 'field "messages" is empty'),
    (msgs(U, "hi", A), 'field "messages[1]" must be an object, got str'),
    (msgs(U, {"role": "bot", "content": "x"}, A),
     'field "messages[1].role" must be one of "system", "user", "assistant", "tool" (got "bot")'),
    (msgs(U, {"content": "x"}, A), 'field "messages[1].role" must be one of "system", "user", "assistant", "tool" '
                                   '(missing)'),
    (msgs(U, A, {"role": "system", "content": "x"}, U, A),
     'field "messages[2].role" is "system" but only the first message may be a system message'),
    (msgs(A, U, A), 'field "messages[0].role" is "assistant" but the conversation must start with a user message'),
    (msgs(U, A, U), 'field "messages[2].role" is "user" but the last message must be an assistant message'),
    (msgs(U, {"role": "assistant", "content": None}),
     'field "messages[1].content" must be a string, got null (null is allowed only on assistant messages with '
     'tool_calls)'),
    (msgs({"role": "user", "content": [{"type": "text", "text": "hi"}]}, A),
     'field "messages[0].content" must be a string, got list'),
    (msgs({"role": "user"}, A), 'field "messages[0].content" is missing'),
    (msgs(U, {"role": "assistant", "content": "  "}), 'field "messages[1].content" is empty'),
    (msgs({"role": "user", "content": "hi", "tool_calls": [call({})]}, A),
     'field "messages[0].tool_calls" is only allowed on assistant messages'),
    (msgs(U, {"role": "assistant", "tool_calls": [call('{"city": Paris}')]}, {"role": "tool", "content": "x"}, A),
     'field "messages[1].tool_calls[0].function.arguments" is a string but not valid JSON: Expecting value '
     '(column 10)'),
    (msgs(U, {"role": "assistant", "tool_calls": [call("[1]")]}, {"role": "tool", "content": "x"}, A),
     'field "messages[1].tool_calls[0].function.arguments" must be a JSON object (or a string holding one), '
     'got list'),
    (msgs(U, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
          {"role": "tool", "content": "x"}, A), 'field "messages[1].tool_calls[0].function.arguments" is missing'),
    (msgs(U, {"role": "assistant", "tool_calls": [{"type": "function"}]}, {"role": "tool", "content": "x"}, A),
     'field "messages[1].tool_calls[0].function" is missing'),
    (msgs(U, {"role": "assistant", "tool_calls": [call({}, name="")]}, {"role": "tool", "content": "x"}, A),
     'field "messages[1].tool_calls[0].function.name" must be a non-empty string, got ""'),
    (msgs(U, {"role": "assistant", "tool_calls": [call({}, name="search")]}, {"role": "tool", "content": "x"}, A,
          tools=[WEATHER_TOOL]),
     'field "messages[1].tool_calls[0].function.name" is "search", which is not one of the row\'s tools '
     '("get_weather")'),
    (msgs(U, {"role": "tool", "content": "x"}, A),
     'field "messages[1].role" is "tool" but it does not follow an assistant message with tool_calls'),
    (msgs(U, {"role": "assistant", "tool_calls": [call({}, id="c1")]}, {"role": "tool", "content": "x"}, A),
     'field "messages[2].tool_call_id" is missing; the tool calls it answers have ids "c1"'),
    (msgs(U, {"role": "assistant", "tool_calls": [call({}, id="c1")]},
          {"role": "tool", "tool_call_id": "c2", "content": "x"}, A),
     'field "messages[2].tool_call_id" is "c2", which answers no earlier tool call (the preceding tool calls have '
     'ids "c1")'),
    (msgs(U, A, tools={"type": "function"}), 'field "tools" must be a list of tool objects, got object'),
    (msgs(U, A, tools=[{"function": {"name": "f"}}]), 'field "tools[0].type" must be "function", got nothing'),
    (msgs(U, A, tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
     'field "tools[0].function.parameters" must be a JSON schema object, got str'),
    (msgs(U, A, tools=[{"type": "function", "function": {"description": "d"}}]),
     'field "tools[0].function.name" must be a non-empty string, got null'),
])
def test_row_errors_name_line_and_field_path(tmp_path, row, expected):
    f = write(tmp_path / "train.jsonl", msgs(U, A), row)
    message = load_error(f)
    assert message.startswith(f"{f}:2: {expected}"), message
    assert "(OpenAI chat format) ending with an assistant message." in message  # the row hint


def test_all_problems_of_a_row_are_reported(tmp_path):
    f = write(tmp_path / "train.jsonl", msgs({"role": "user", "content": 1}, {"role": "robot", "content": "x"}))
    message = load_error(f)
    assert message.startswith("2 problems in the dataset:")
    assert f'{f}:1: field "messages[0].content" must be a string, got int.' in message
    assert f'{f}:1: field "messages[1].role" must be one of' in message


def test_chat_file_with_a_prompt_completion_row_is_an_error_naming_the_line(tmp_path):
    f = write(tmp_path / "train.jsonl", msgs(U, A), msgs(U, A), {"prompt": "p", "completion": "c"})
    assert load_error(f).startswith(f'{f}:3: row is prompt/completion data (keys found: "prompt", "completion") but '
                                    f"this file's first row is chat data; a file holds one format.")


def test_prompt_completion_file_with_a_chat_row_is_an_error_naming_the_line(tmp_path):
    f = write(tmp_path / "train.jsonl", {"prompt": "p", "completion": "c"}, msgs(U, A))
    assert f"{f}:2: row is chat data but this file's first row is prompt_completion data" in load_error(f)


def test_chat_training_with_prompt_completion_validation_is_an_error(tmp_path):
    write(tmp_path / "training.jsonl", msgs(U, A))
    write(tmp_path / "validation.jsonl", {"prompt": "p", "completion": "c"})
    assert "validation data is prompt_completion but training data is chat" in load_error(tmp_path)


def test_conversation_without_final_assistant_turn_is_rejected(tmp_path):
    # Replaces the pre-chat "chat data is not supported yet" check: chat rows are now validated, not refused.
    f = write(tmp_path / "train.jsonl", msgs(U))
    assert load_error(f).startswith(f'{f}:1: field "messages[0].role" is "user" but the last message must be an '
                                    f"assistant message (the turn to train on).")
