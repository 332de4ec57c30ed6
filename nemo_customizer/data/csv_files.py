"""Read a CSV (``.csv``) or tab-separated (``.tsv``) file: a header of column names, then one row per record.

Every value stays the text it is in the file: no type guessing, so a completion ``"007"`` stays ``"007"``, ``NA``
stays ``"NA"`` and an empty cell is an empty string (reported by the format's checks as an empty field). Rows are
located as ``path:line``, the line the record starts on (the header is line 1). Quoting is parsed strictly (Python's
``csv`` with ``strict=True``); a record with more or fewer fields than the header is an error, never padded.
"""

from __future__ import annotations

import contextlib
import csv
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from nemo_customizer.data.errors import IssueLog
from nemo_customizer.data.jsonl import READ_HINT, UTF8_BOM, UTF8_HINT, JsonLine, shown_value, whole_file_problem

CSV_HINT = ("A CSV file needs a header row of column names, then one record per row with as many fields; quote "
            'fields that hold the separator, quotes or line breaks ("a ""quoted"" word").')
DELIMITERS = {".csv": ",", ".tsv": "\t"}
_FIELD_LIMIT = 2**31 - 1
"""Longest field accepted: ``csv``'s default (131072 characters) is shorter than a long-context prompt."""


class _Undecodable(Exception):
    """A line that is not UTF-8 text: reported at the line, and the rest of the file is not parsed."""

    def __init__(self, location: str, problem: str, hint: str = UTF8_HINT) -> None:
        super().__init__(problem)
        self.location, self.problem, self.hint = location, problem, hint


def read_csv_file(path: Path, issues: IssueLog) -> Iterator[JsonLine]:
    """Yield each record of ``path`` as ``{column: text}``; problems are added to ``issues``.

    The separator is a comma, or a tab for ``.tsv`` files. A problem with the file's structure (bad quoting, a NUL
    byte, bytes that are not UTF-8) ends reading it: what follows cannot be split into records reliably.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            issues.add(str(path), "not a regular file", READ_HINT)
            return
        with path.open("rb") as f, _long_fields():
            yield from _records(path, f, DELIMITERS.get(path.suffix.lower(), ","), issues)
    except OSError as e:
        issues.add(str(path), f"cannot read the file: {e.strerror or e}", READ_HINT)
    except _Undecodable as e:
        issues.add(e.location, e.problem, e.hint)


def _records(path: Path, f: BinaryIO, delimiter: str, issues: IssueLog) -> Iterator[JsonLine]:
    reader = csv.reader(_text_lines(path, f), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return  # no rows: the caller reports an empty file
        if duplicates := sorted({name for name in header if header.count(name) > 1}):
            issues.add(f"{path}:1", f"the header names column {shown_value(duplicates[0])} twice",
                       "Give every column of the header a different name.")
            return
        while True:
            start = reader.line_num + 1
            record = next(reader, None)
            if record is None:
                return
            if not record:
                continue  # a blank line
            location = f"{path}:{start}"
            if len(record) != len(header):
                issues.add(location, f"record has {len(record)} fields but the header has {len(header)}", CSV_HINT)
                continue
            yield JsonLine(location, dict(zip(header, record)))
    except csv.Error as e:
        issues.add(f"{path}:{reader.line_num}", f"not valid CSV: {e}", CSV_HINT)


def _text_lines(path: Path, f: BinaryIO) -> Iterator[str]:
    """``f``'s lines as text, line endings kept (``csv`` needs them inside quoted fields)."""
    for line_no, raw in enumerate(f, start=1):
        if line_no == 1:
            if problem := whole_file_problem(raw):
                raise _Undecodable(str(path), *problem)
            raw = raw.removeprefix(UTF8_BOM)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Undecodable(f"{path}:{line_no}", f"bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                                    f"column {e.start + 1})") from None


@contextlib.contextmanager
def _long_fields() -> Iterator[None]:
    previous = csv.field_size_limit(_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(previous)
