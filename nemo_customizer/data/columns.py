"""``dataset.columns``: the user's column names mapped onto the field names our row shapes read.

``{"prompt": "question", "completion": "answer"}`` reads each row's ``question`` as ``prompt`` and ``answer`` as
``completion``; the mapped columns leave the row under their own names, other columns stay (and are ignored as
usual). Renaming happens before a file's shape is detected, so a mapping can make rows of any shape: chat
(``messages``), preference pairs (``chosen``/``rejected``), Alpaca (``instruction``/``output``), ...
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Optional

from nemo_customizer.data.formats.base import Row
from nemo_customizer.data.jsonl import shown_keys, shown_value

COLUMNS_HINT = ("Map each field to a column your data has (dataset.columns.FIELD=COLUMN, or columns of its "
                "dataset.mix entry), or remove the entry.")
FIELDS = ("prompt", "completion", "messages", "tools", "chosen", "rejected", "instruction", "input", "output",
          "conversations", "system")
"""Every field name a row shape reads: what ``dataset.columns`` may map onto (``config.schema.ColumnsConfig``)."""


@dataclass(frozen=True)
class ColumnMap:
    """``{our field: the user's column}``, applied to each row."""

    fields: Mapping[str, str]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"cannot map columns onto {', '.join(unknown)}: the fields are {', '.join(FIELDS)}")

    def apply(self, row: Row) -> tuple[Row, Optional[str]]:
        """``row`` with the mapped columns renamed; or ``row`` and the problem when one of them is missing."""
        for field, column in self.fields.items():
            if column not in row:
                return row, (f"column {shown_value(column)} (mapped to {field}) is missing "
                             f"(keys found: {shown_keys(row)})")
        renamed = {key: value for key, value in row.items() if key not in self._sources}
        for field, column in self.fields.items():
            renamed[field] = row[column]
        return renamed, None

    @cached_property
    def _sources(self) -> frozenset[str]:
        return frozenset(self.fields.values())
