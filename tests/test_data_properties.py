"""Property-based tests (hypothesis) of the loaders: whatever bytes, text or JSON a file holds, loading either returns
valid examples or raises ``DatasetError`` naming the file (and 1-based lines that exist); chat validation never
crashes on generated message lists, and a row it accepts always tokenizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nemo_customizer.data import DatasetError, load_dataset, tokenize_examples
from nemo_customizer.data.chat_rows import ROLES, chat_row_problems
from nemo_customizer.data.formats.chat import build_example

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
# Rows near the real formats, so generated data reaches the field checks and not only "row must be an object".
near_rows = st.fixed_dictionaries({}, optional={"prompt": json_values, "completion": json_values,
                                                "messages": json_values, "tools": json_values, "extra": json_values})
tool_calls = st.lists(st.fixed_dictionaries(
    {"function": st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "", 3]),
                                        "arguments": st.sampled_from(['{"city": "Paris"}', "{city}", {}, [], "[]"])})},
    optional={"id": st.sampled_from(["c1", "c2", 7]), "type": st.sampled_from(["function", "other"])}), max_size=2)
# Mostly well-typed messages in a random order, so that some rows pass validation and reach the chat template.
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "user", "assistant", "bot", None, 1]),
                                           "content": st.text(max_size=20) | st.none() | st.integers()},
                                          optional={"tool_calls": st.none() | tool_calls | st.just({"name": "x"}),
                                                    "tool_call_id": st.sampled_from(["c1", "c2", 7])})
                    | st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
                    max_size=6)
weather_tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from nemo_customizer.checkpoints.resolve import load_tokenizer

    return load_tokenizer(model_dir, "chatml-tools")


def load_or_error(path: Path, data: bytes):
    """Load ``data`` written to ``path``: the splits, or the checked ``DatasetError`` message."""
    path.write_bytes(data)
    try:
        return load_dataset(path, val_fraction=0.0)
    except DatasetError as e:
        message = str(e)
    assert str(path) in message and len(message) < 4000, message
    n_lines = data.count(b"\n") + 1
    for line in re.findall(re.escape(str(path)) + r":(\d+):", message):
        assert 1 <= int(line) <= n_lines, message
    return message


def check_all_rows_kept(splits, path: Path, data: bytes) -> None:
    """A load that succeeds kept every non-blank line, in order, each naming its own line."""
    lines = [i for i, raw in enumerate(data.split(b"\n"), start=1)
             if raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8").strip()]
    assert [e.origin for e in splits.train] == [f"{path}:{i}" for i in lines]


@FAST
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes(workdir, data):
    result = load_or_error(workdir / "train.jsonl", data)
    if not isinstance(result, str):
        check_all_rows_kept(result, workdir / "train.jsonl", data)


@FAST
@given(lines=st.lists(st.text(max_size=60), max_size=6), ending=st.sampled_from(["\n", "\r\n", "\r"]))
def test_arbitrary_text_lines(workdir, lines, ending):
    data = ending.join(lines).encode("utf-8")
    result = load_or_error(workdir / "train.jsonl", data)
    if not isinstance(result, str):
        check_all_rows_kept(result, workdir / "train.jsonl", data)


@FAST
@given(values=st.lists(json_values | near_rows, min_size=1, max_size=5), ascii_only=st.booleans(),
       bom=st.booleans(), crlf=st.booleans())
def test_arbitrary_json_values(workdir, values, ascii_only, bom, crlf):
    text = ("\r\n" if crlf else "\n").join(json.dumps(v, ensure_ascii=ascii_only) for v in values)
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    result = load_or_error(workdir / "train.jsonl", data)
    if not isinstance(result, str):
        check_all_rows_kept(result, workdir / "train.jsonl", data)


@FAST
@given(pairs=st.lists(st.tuples(st.text(min_size=1, max_size=30).filter(str.strip),
                                st.text(min_size=1, max_size=30).filter(str.strip)), min_size=1, max_size=6),
       blank_lines=st.integers(0, 2), bom=st.booleans(), crlf=st.booleans())
def test_valid_rows_load_exactly(workdir, pairs, blank_lines, bom, crlf):
    ending = "\r\n" if crlf else "\n"
    rows = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in pairs]
    data = (b"\xef\xbb\xbf" if bom else b"") + (ending * (blank_lines + 1)).join(rows).encode("utf-8")
    splits = load_or_error(workdir / "train.jsonl", data)
    assert not isinstance(splits, str), splits
    assert [(e.prompt, e.completion) for e in splits.train] == pairs


@SLOW
@given(messages=messages, tools=st.none() | st.just([weather_tool]) | st.just({"x": 1}))
def test_chat_validation_never_crashes_and_accepted_rows_tokenize(tokenizer, messages, tools):
    row = {"messages": messages} if tools is None else {"messages": messages, "tools": tools}
    problems = chat_row_problems(row)
    assert all(isinstance(p, str) and p.startswith("field ") for p in problems)
    event("rejected" if problems else "accepted")
    if problems:
        return
    conversation = build_example(row, "data.jsonl:1")
    try:
        tokenized, stats = tokenize_examples([conversation], tokenizer, max_seq_length=4096)
    except DatasetError as e:  # a row the template cannot render: named by its origin
        assert str(e).startswith("data.jsonl:1: ")
        return
    assert stats.dropped == 0 and sum(tokenized[0].loss_mask) > 0


turn_text = st.text(st.characters(codec="utf-8", exclude_characters="<>|"), min_size=1, max_size=20).filter(str.strip)


@st.composite
def valid_conversations(draw):
    """A system prompt (maybe), then user turns each answered by the assistant, some through a tool call."""
    out = [{"role": "system", "content": draw(turn_text)}] if draw(st.booleans()) else []
    for turn in range(draw(st.integers(1, 3))):
        out.append({"role": "user", "content": draw(turn_text)})
        if draw(st.booleans()):
            call_id = f"call{turn}"
            arguments = json.dumps({"city": draw(turn_text)})
            out.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]})
            out.append({"role": "tool", "tool_call_id": call_id, "content": draw(turn_text)})
        out.append({"role": "assistant", "content": draw(turn_text)})
    return out


@SLOW
@given(conversation=valid_conversations())
def test_valid_conversations_are_accepted_and_train_on_every_assistant_turn(tokenizer, conversation):
    row = {"messages": conversation, "tools": [weather_tool]}
    assert chat_row_problems(row) == []
    tokenized, stats = tokenize_examples([build_example(row, "data.jsonl:1")], tokenizer, max_seq_length=4096)
    assert stats.unchanged == 1
    example = tokenized[0]
    trained = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    for message in conversation:
        if message["role"] == "assistant" and message.get("content"):
            assert message["content"] in trained
