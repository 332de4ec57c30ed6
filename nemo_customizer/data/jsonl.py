"""Read a JSONL file into ``(line number, value)`` pairs, recording unusable lines instead of stopping.

Hostile input ends here as a ``DatasetIssue`` naming ``file:line``, never as an exception from deep inside: invalid
JSON, bytes that are not UTF-8 (latin-1, UTF-16, NUL bytes, compressed or binary files), JSON the rest of the pipeline
cannot use safely (duplicate keys, ``NaN``, lone UTF-16 surrogates, nesting deeper than ``MAX_JSON_DEPTH``, numbers
longer than Python converts) and files that cannot be read at all. A UTF-8 byte-order mark and ``\\r\\n`` line
endings are accepted.
"""

from __future__ import annotations

import itertools
import json
import stat
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, NoReturn, Optional

from nemo_customizer.data.errors import IssueLog

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_HINT = "Save the file as UTF-8 (without a byte-order mark is best; a UTF-8 one is accepted)."
JSON_HINT = "Each line must hold one complete JSON value; check for unescaped quotes or a record split over lines."
JSON_LINES_HINT = ("Write one JSON object per line (JSON Lines), or name a file holding one JSON array of rows "
                   "*.json; an array converts with `jq -c '.[]' data.json > data.jsonl`.")
READ_HINT = "Check that the file exists, is a regular file and is readable (permissions), then run again."
MAX_JSON_DEPTH = 100
"""Deepest nesting of arrays/objects accepted in one line: far beyond any chat row or tool schema, and shallow enough
that later steps (error messages, chat templates) never hit Python's recursion limit."""
MAX_SHOWN_CHARS = 40
MAX_SHOWN_KEYS = 8
_JSON_TYPE_NAMES = {bool: "bool", int: "int", float: "float", type(None): "null", str: "str", list: "list",
                    dict: "object"}
_BINARY_MAGIC = (  # file signatures people pass by mistake: (prefix, what it is, what to do)
    (b"\x1f\x8b", "gzip-compressed", "Decompress it (gunzip FILE) and pass the .jsonl file."),
    (b"PK\x03\x04", "a zip archive", "Extract the .jsonl file(s) from it and pass those."),
    (b"BZh", "bzip2-compressed", "Decompress it (bunzip2 FILE) and pass the .jsonl file."),
    (b"\xfd7zXZ\x00", "xz-compressed", "Decompress it (unxz FILE) and pass the .jsonl file."),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "Decompress it (unzstd FILE) and pass the .jsonl file."),
    (b"PAR1", "a Parquet file", "Convert it to JSON Lines, e.g. pandas.read_parquet(FILE).to_json(OUT, "
                                "orient='records', lines=True)."),
)


class JsonLine(NamedTuple):  # a tuple: one is made per row, a million times for a million rows
    """One non-blank line of a JSONL file, parsed."""

    location: str
    """``path:line`` with a 1-based line number, as shown in error messages."""
    value: Any


class JsonValueError(ValueError):
    """Text that is not strict JSON we accept; the message is the problem as users see it (``invalid JSON: ...``)."""

    line: Optional[int] = None
    """1-based line of the text where the syntax error is (multi-line documents); ``None`` for other problems."""


def read_jsonl(path: Path, issues: IssueLog) -> Iterator[JsonLine]:
    """Yield every non-blank line of ``path``, parsed; unusable lines and unreadable files are added to ``issues``.

    A generator, so callers record problems in line order and never hold a whole file of parsed rows twice.
    A UTF-8 byte-order mark at the start of a line is skipped (editors on Windows write one at the start of a file;
    ``cat`` of such files puts one mid-file). Lines are split on ``\\n`` only, so line numbers match what editors
    show, and a trailing ``\\r`` is ignored by the JSON parser. Problems that make the whole file unusable (UTF-16,
    compressed, a multi-line JSON document, unreadable) are recorded once, at the file, and end reading it.
    """
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):  # a pipe would block forever, a device never ends
            issues.add(str(path), "not a regular file", READ_HINT)
            return
        with path.open("rb") as f:
            yield from _read_lines(path, f, issues)
    except OSError as e:  # permissions, a broken link or link loop, an I/O error mid-file
        issues.add(str(path), f"cannot read the file: {e.strerror or e}", READ_HINT)


def _read_lines(path: Path, f, issues: IssueLog) -> Iterator[JsonLine]:
    first = True
    prefix = f"{path}:"
    for line_no, raw in enumerate(f, start=1):
        location = f"{prefix}{line_no}"
        raw = raw.removeprefix(UTF8_BOM)
        if line_no == 1 and (problem := whole_file_problem(raw)):
            issues.add(str(path), *problem)
            return
        if b"\x00" in raw:
            column = raw.index(b"\x00") + 1
            issues.add(location, f"holds a NUL byte (column {column}): the file is binary or not UTF-8 text", UTF8_HINT)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            issues.add(location, f"bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                       UTF8_HINT)
            continue
        if not text or text.isspace():
            continue  # blank lines (often a trailing newline) carry no row
        try:
            value = parse_json(text)
        except JsonValueError as e:
            if first and _starts_json_document(text):
                issues.add(str(path), "file is one JSON document spread over several lines, not JSON Lines",
                           JSON_LINES_HINT)
                return
            issues.add(location, _with_line_ending_note(str(e), text), JSON_HINT)
            first = False
            continue
        first = False
        yield JsonLine(location, value)


def whole_file_problem(first_line: bytes) -> Optional[tuple[str, str]]:
    """``(problem, hint)`` when the first line shows the file is not UTF-8 JSON Lines at all."""
    if first_line.startswith(UTF16_BOMS) or _looks_utf16(first_line):
        return "file is UTF-16 encoded", UTF8_HINT
    for magic, what, hint in _BINARY_MAGIC:
        if first_line.startswith(magic):
            return f"file is {what}, not JSON Lines text", hint
    return None


def _looks_utf16(raw: bytes) -> bool:
    """UTF-16 without a byte-order mark: ASCII text with a NUL byte after (or before) every character."""
    body = raw.rstrip(b"\r\n\x00")
    return len(body) >= 4 and any(body) and (not any(body[1::2]) or not any(body[0::2]))


def _starts_json_document(text: str) -> bool:
    """The first line of a pretty-printed JSON file (``[`` or ``{`` alone, or an array that goes on)."""
    stripped = text.strip()
    return stripped in ("[", "{") or stripped.startswith("[")


def _with_line_ending_note(problem: str, text: str) -> str:
    if "\r" in text.rstrip("\r\n"):  # classic Mac line endings: the whole file reads as one line
        return problem + "; the line holds \\r characters: save the file with \\n (or \\r\\n) line endings"
    return problem


# --- strict JSON ---------------------------------------------------------------------------------------------------

def parse_json(text: str) -> Any:
    """``text`` as one JSON value, refusing what ``json.loads`` lets through but later steps trip over.

    Raises ``JsonValueError`` (``invalid JSON: ...``) for syntax errors, duplicate keys in one object (``json``
    silently keeps the last), ``NaN``/``Infinity`` (not JSON), integers of more digits than Python converts, nesting
    deeper than ``MAX_JSON_DEPTH`` and ``\\u`` escapes of lone UTF-16 surrogates (no tokenizer can encode them).
    """
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        error = JsonValueError(f"invalid JSON: {e.msg} (column {e.colno})")
        error.line = e.lineno
        raise error from None
    except RecursionError:
        raise JsonValueError(f"invalid JSON: nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # our hooks' messages, or int() refusing a number of more than 4300 digits
        problem = str(e)
        if problem.startswith("Exceeds the limit"):
            problem = f"a number has more than {sys.get_int_max_str_digits()} digits"
        raise JsonValueError(f"invalid JSON: {problem}") from None
    # Depth is at most the number of brackets, so typical rows skip the walk.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise JsonValueError(f"invalid JSON: nested more than {MAX_JSON_DEPTH} levels deep")
    if "\\u" in text and _has_lone_surrogate(value):
        raise JsonValueError("invalid JSON: a \\u escape encodes a lone UTF-16 surrogate (half of a character pair), "
                             "which is not text")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {shown_value(duplicate)} appears twice in one object")
    return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value (use null, a number or a string)")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant)


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:  # iterative: a recursive walk would hit the recursion limit on exactly the inputs it looks for
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- showing values in messages ------------------------------------------------------------------------------------

def json_type_name(value: Any) -> str:
    """The name users see for a parsed JSON value's type (``int``, ``null``, ``object``, ...)."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def shown_value(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``value`` as JSON for an error message, cut to ``limit`` characters (a 10 MB field stays one short line)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        text = f"<{json_type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_keys(row: dict[str, Any]) -> str:
    """The keys of ``row`` for a message: ``"a", "b"``, the first ``MAX_SHOWN_KEYS`` only, or ``none``."""
    keys = [shown_value(k) for k in itertools.islice(row, MAX_SHOWN_KEYS)]
    more = f", ... ({len(row)} keys)" if len(row) > MAX_SHOWN_KEYS else ""
    return ", ".join(keys) + more if keys else "none"


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, UTF-8 (non-ASCII characters as they are)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
