"""Read a ``.json`` file: one JSON array of row objects (Alpaca's ``alpaca_data.json``), or JSON Lines (what
``datasets``' ``to_json`` writes under a ``.json`` name).

Rows of an array are checked as strictly as JSON Lines rows (``jsonl.parse_json``: duplicate keys, ``NaN``, lone
surrogates refused); they are located as ``path row N`` (1-based), and a syntax error as ``path:line``.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Iterator

from nemo_customizer.data.errors import IssueLog
from nemo_customizer.data.jsonl import (READ_HINT, UTF8_BOM, UTF8_HINT, JsonLine, JsonValueError, parse_json,
                                        read_jsonl)

ARRAY_HINT = ("A .json file must be one JSON array of row objects, or one JSON object per line; "
              "`python -m json.tool FILE` shows where the JSON breaks.")
_PEEK_BYTES = 4096


def read_json_file(path: Path, issues: IssueLog) -> Iterator[JsonLine]:
    """Yield every row of ``path``: the elements of its top-level array, or its lines when it is not an array.

    Whether it is an array is decided by its first character other than whitespace (and a UTF-8 byte-order mark);
    anything else, including UTF-16 or compressed files, goes to ``read_jsonl``, which explains what it finds.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            issues.add(str(path), "not a regular file", READ_HINT)
            return
        with path.open("rb") as f:
            start = f.read(_PEEK_BYTES)
            data = start + f.read() if start.removeprefix(UTF8_BOM).lstrip().startswith(b"[") else None
    except OSError as e:
        issues.add(str(path), f"cannot read the file: {e.strerror or e}", READ_HINT)
        return
    if data is None:
        yield from read_jsonl(path, issues)
    else:
        yield from _array_rows(path, data.removeprefix(UTF8_BOM), issues)


def _array_rows(path: Path, data: bytes, issues: IssueLog) -> Iterator[JsonLine]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        issues.add(f"{path}:{line}", f"bytes are not valid UTF-8 (byte 0x{data[e.start]:02x})", UTF8_HINT)
        return
    try:
        rows = parse_json(text)
    except JsonValueError as e:
        issues.add(f"{path}:{e.line}" if e.line else str(path), str(e), ARRAY_HINT)
        return
    prefix = f"{path} row "
    for number, row in enumerate(rows, start=1):
        yield JsonLine(f"{prefix}{number}", row)
