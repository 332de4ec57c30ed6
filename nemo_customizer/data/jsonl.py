"""Read a JSONL file into ``(line number, value)`` pairs, recording undecodable lines instead of stopping."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from nemo_customizer.data.errors import IssueLog

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_HINT = "Save the file as UTF-8 (without a byte-order mark is best; a UTF-8 one is accepted)."
_JSON_TYPE_NAMES = {bool: "bool", int: "int", float: "float", type(None): "null", str: "str", list: "list",
                   dict: "object"}
JSON_HINT = "Each line must hold one complete JSON value; check for unescaped quotes or a record split over lines."


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSONL file, parsed."""

    location: str
    """``path:line`` with a 1-based line number, as shown in error messages."""
    value: Any


def read_jsonl(path: Path, issues: IssueLog) -> Iterator[JsonLine]:
    """Yield every non-blank line of ``path``, parsed; undecodable bytes and invalid JSON are added to ``issues``.

    A generator, so callers record problems in line order and never hold a whole file of parsed rows twice.
    A UTF-8 byte-order mark at the start is skipped (editors on Windows write one). Lines are split on ``\\n`` only,
    so line numbers match what editors show, and a trailing ``\\r`` is ignored by the JSON parser.
    """
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            location = f"{path}:{line_no}"
            if line_no == 1:
                if raw.startswith(UTF16_BOMS):
                    issues.add(str(path), "file is UTF-16 encoded", UTF8_HINT)
                    return
                raw = raw.removeprefix(UTF8_BOM)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.add(location, f"bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                           UTF8_HINT)
                continue
            if not text.strip():
                continue  # blank lines (often a trailing newline) carry no row
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                issues.add(location, f"invalid JSON: {e.msg} (column {e.colno})", JSON_HINT)
                continue
            yield JsonLine(location, value)


def json_type_name(value: Any) -> str:
    """The name users see for a parsed JSON value's type (``int``, ``null``, ``object``, ...)."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
