"""Row shapes: how a row is recognized and turned into a row of one of our formats.

Each format (``formats/``) reads rows of its own shape. Three other shapes are common in public datasets:

- **Alpaca** ``{"instruction", "input", "output"}`` (``input`` optional) becomes a prompt/completion row: the prompt
  is Alpaca's template (``ALPACA_PROMPT``, or ``ALPACA_PROMPT_NO_INPUT`` when ``input`` is absent, null or blank)
  and the completion is ``output``.
- **ShareGPT** ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system": ...}`` becomes a chat
  row: ``human`` -> ``user``, ``gpt`` -> ``assistant``, ``system`` -> ``system``, ``value`` -> ``content``; a
  top-level ``system`` string becomes the first message. ``conversations`` already in OpenAI's ``role``/``content``
  form is taken as ``messages``.
- **plain text** ``{"text"}`` without a prompt or completion is refused: training on raw text (continued
  pretraining) is not supported; the message says what to give instead.

A file's shape is that of its first row (``detect_shape``); each row is checked in its own field names before it is
converted, so messages name the fields the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from nemo_customizer.data.formats import CHAT, FORMATS, PREFERENCE, PROMPT_COMPLETION, DataFormat
from nemo_customizer.data.formats.base import Row
from nemo_customizer.data.jsonl import json_type_name, shown_keys, shown_value

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
"""Stanford Alpaca's prompt for a row with an ``input``."""
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")
"""Stanford Alpaca's prompt for a row without an ``input`` (absent, null or blank)."""
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
COLUMNS_TIP = ("If your data names these fields differently, map them with dataset.columns (e.g. "
               "dataset.columns.prompt=question).")


@dataclass(frozen=True)
class RowShape:
    """One shape of row: how it is recognized, checked and turned into a row of ``format``."""

    name: str
    """How messages name rows of this shape ("alpaca", or the format's own name)."""
    rows: str
    """What its rows are called in messages ("Alpaca rows")."""
    format: DataFormat
    """The format its rows become."""
    matches: Callable[[Row], bool]
    hint: str
    """What a valid row looks like (and what it becomes), as a sentence; ends every message about a row."""
    problems: Optional[Callable[[Row], list[str]]] = None
    """Everything wrong with a row in its own field names; ``None``: the format's ``row_problems``."""
    convert: Optional[Callable[[Row], Row]] = None
    """A valid row -> a row of ``format``; ``None``: the row already is one."""
    refused: Optional[str] = None
    """When set, data of this shape is not trained on: the problem reported (once per file) instead."""


def _format_shape(fmt: DataFormat, rows: str) -> RowShape:
    return RowShape(name=fmt.name, rows=rows, format=fmt, matches=fmt.matches, hint=fmt.row_hint)


# --- Alpaca ----------------------------------------------------------------------------------------------------------

def alpaca_prompt(row: Row) -> str:
    """The prompt of a valid Alpaca row: ``ALPACA_PROMPT`` with its input, ``ALPACA_PROMPT_NO_INPUT`` without."""
    text = row.get("input")
    if isinstance(text, str) and text.strip():
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def _alpaca_problems(row: Row) -> list[str]:
    problems = [_text_problem(row, name) for name in ("instruction", "output")]
    if row.get("input") is not None and not isinstance(row["input"], str):
        problems.append(f'field "input" must be a string or null, got {json_type_name(row["input"])} '
                        f'(value {shown_value(row["input"])})')
    return [p for p in problems if p]


def _text_problem(row: Row, name: str) -> Optional[str]:
    if name not in row:
        return f'field "{name}" is missing (keys found: {shown_keys(row)})'
    value = row[name]
    if not isinstance(value, str):
        return f'field "{name}" must be a string, got {json_type_name(value)} (value {shown_value(value)})'
    return None if value.strip() else f'field "{name}" is empty'


ALPACA = RowShape(
    name="alpaca", rows="Alpaca rows", format=PROMPT_COMPLETION,
    matches=lambda row: "instruction" in row and "prompt" not in row,
    hint=('Alpaca rows {"instruction": str, "input": str (optional), "output": str} become prompt/completion rows: '
          "the prompt is Alpaca's template around instruction and input, the completion is output. " + COLUMNS_TIP),
    problems=_alpaca_problems,
    convert=lambda row: {"prompt": alpaca_prompt(row), "completion": row["output"]},
)


# --- ShareGPT --------------------------------------------------------------------------------------------------------

def _sharegpt_problems(row: Row) -> list[str]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        return [f'field "conversations" must be a list of turn objects, got {json_type_name(turns)}']
    if not turns:
        return ['field "conversations" is empty']
    problems = []
    if row.get("system") is not None and not isinstance(row["system"], str):
        problems.append(f'field "system" must be a string, got {json_type_name(row["system"])}')
    if _openai_messages(turns):
        return problems  # role/content messages under another name: the chat checks name their problems
    for i, turn in enumerate(turns):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict):
            problems.append(f'field "{at}" must be an object, got {json_type_name(turn)}')
            continue
        if turn.get("from") not in SHAREGPT_ROLES:
            shown = "missing" if "from" not in turn else f"got {shown_value(turn['from'])}"
            problems.append(f'field "{at}.from" must be one of "system", "human", "gpt" ({shown})')
        if not isinstance(turn.get("value"), str):
            shown = "missing" if "value" not in turn else f"got {json_type_name(turn['value'])}"
            problems.append(f'field "{at}.value" must be a string ({shown})')
    return problems


def _openai_messages(turns: list[Any]) -> bool:
    return all(isinstance(turn, dict) and "role" in turn and "from" not in turn for turn in turns)


def _sharegpt_to_chat(row: Row) -> Row:
    turns = row["conversations"]
    if _openai_messages(turns):
        messages = list(turns)
    else:
        messages = [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in turns]
    if isinstance(row.get("system"), str) and row["system"].strip() and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})
    return {"messages": messages, **({"tools": row["tools"]} if "tools" in row else {})}


SHAREGPT = RowShape(
    name="sharegpt", rows="ShareGPT rows", format=CHAT,
    matches=lambda row: "conversations" in row,
    hint=('ShareGPT rows {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]} become chat rows: '
          "conversations[i] is messages[i] (human -> user, gpt -> assistant), and the last turn must be from gpt."),
    problems=_sharegpt_problems,
    convert=_sharegpt_to_chat,
)


# --- plain text ------------------------------------------------------------------------------------------------------

TEXT = RowShape(
    name="plain text", rows="plain text rows", format=PROMPT_COMPLETION,
    matches=lambda row: "text" in row and "prompt" not in row and "completion" not in row,
    hint=('Fine-tuning learns answers: give each row {"prompt": str, "completion": str} (or chat "messages"), '
          "splitting each text into the part the model reads and the part it learns to write. " + COLUMNS_TIP),
    refused=('rows are plain text (a "text" field without prompt and completion): training on raw text '
             "(continued pretraining) is not supported"),
)


SHAPES: tuple[RowShape, ...] = (
    _format_shape(CHAT, "chat rows"),
    _format_shape(PREFERENCE, "preference pairs"),
    SHAREGPT,
    ALPACA,
    TEXT,
    _format_shape(PROMPT_COMPLETION, "prompt/completion rows"),
)
"""Detection order: the first shape whose ``matches`` accepts a file's first JSON object is the file's shape. Our
formats' own shapes come first, so a row with ``messages`` is chat even when it also has a ``text`` field; the last is
the fallback that accepts anything."""
assert {shape.format for shape in SHAPES} == set(FORMATS) and SHAPES[-1].format is PROMPT_COMPLETION


def detect_shape(row: Row) -> RowShape:
    """The shape of a file whose first JSON object is ``row``."""
    return next(shape for shape in SHAPES if shape.matches(row))


def other_shape(row: Row, shape: RowShape) -> Optional[RowShape]:
    """The shape ``row`` positively looks like when that is not ``shape``: the row does not belong in this file.

    Only shapes before the fallback count, so a row of no recognizable shape gets ``shape``'s own field errors.
    """
    for other in SHAPES[:-1]:
        if other.matches(row):
            return None if other is shape else other
    return None
