"""``load_dataset`` / ``load_mixture``: dataset paths -> validated train/validation examples, or one ``DatasetError``
listing problems.

A dataset is read part by part (``sources``: files, or splits of a saved folder or Hub dataset); ``dataset.columns``
renames each row's columns (``columns``); each part's shape is detected from its first row and every row is checked
in its own field names, then converted to a row of our formats (``shapes``) and parsed (``formats``).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from nemo_customizer.data.columns import COLUMNS_HINT, ColumnMap
from nemo_customizer.data.discovery import DatasetFiles
from nemo_customizer.data.errors import IssueLog, raise_one
from nemo_customizer.data.formats import DataFormat
from nemo_customizer.data.jsonl import JSON_LINES_HINT, json_type_name
from nemo_customizer.data.mixing import check_weights, mix_rows, mixture_counts
from nemo_customizer.data.shapes import COLUMNS_TIP, SHAPES, RowShape, detect_shape, other_shape
from nemo_customizer.data.sources import DataPart, DatasetParts, file_part, resolve_parts
from nemo_customizer.data.split import cap_rows, check_val_fraction, split_rows

EMPTY_FILE_HINT = "Add rows (one JSON object per line) or remove the file."
EMPTY_SPLIT_HINT = "Pick a split that has rows with dataset.train_split / dataset.val_split."
MIX_FORMATS_HINT = ("Mix datasets of one format: Alpaca rows mix with prompt/completion rows, ShareGPT rows with chat "
                    "rows, preference pairs with preference pairs.")
_FALLBACK = SHAPES[-1]


@dataclass(frozen=True)
class DatasetSource:
    """One dataset to read: where it is, how its columns are named and, for a mixture, its weight."""

    path: str | Path
    """A file, a directory of split files, a ``save_to_disk`` folder, or a Hub dataset ID ``org/name[:config]``."""
    weight: float = 1.0
    """Mixing weight (``mixing``): its share of the training rows, relative to the other sources' weights."""
    columns: Optional[Mapping[str, str]] = None
    """``{our field: the data's column}`` (``columns``)."""
    train_split: Optional[str] = None
    """The training split of a saved folder or Hub dataset; default: the one named ``train*``."""
    val_split: Optional[str] = None
    """Its validation split; default: the one named ``validation*``/``val*``, else a seeded hold-out."""


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset: validated examples of one format, and where they came from."""

    train: list[Any]
    """Examples of ``format`` (``PromptCompletion``, ``Conversation`` or ``PreferenceExample``), in file order (a
    mixture: each source's draw, sources in order)."""
    val: list[Any]
    format: str
    """Name of the detected ``DataFormat`` (``"prompt_completion"``, ``"chat"`` or ``"preference"``)."""
    files: DatasetFiles
    """The files of a dataset of files (empty for a saved folder, a Hub dataset or a mixture)."""
    val_source: str
    """Where ``val`` came from, e.g. ``"validation files"`` or ``"seeded split (10% of training rows, seed 42)"``."""
    notes: tuple[str, ...] = ()
    """Lines for the job log: the files or splits read, conversions, a mixture's draw."""
    verbatim: bool = False
    """Every row is a line of a ``.jsonl`` file of ``files``, read as written (no column mapping, no conversion), so
    the dataset store can copy the files byte for byte."""

    def describe(self) -> str:
        """A few lines for the job log: files, format, row counts, where validation came from."""
        return "\n".join((f"format: {self.format}; {len(self.train)} training rows, {len(self.val)} validation rows "
                          f"({self.val_source})", *self.notes))


@dataclass
class _SourceRows:
    """One source, read and checked."""

    source: DatasetSource
    parts: DatasetParts
    format: DataFormat
    train: list[Any]
    val: list[Any]
    shapes: list[RowShape]


def load_dataset(
    path: str | Path, val_fraction: float = 0.1, seed: int = 42, *, max_val_examples: Optional[int] = None,
    columns: Optional[Mapping[str, str]] = None, train_split: Optional[str] = None, val_split: Optional[str] = None,
) -> DatasetSplits:
    """Discover, read and validate every row of the dataset at ``path``; hold out validation rows if needed.

    ``path`` is a data file, a directory of them (see ``discover_files``), a ``save_to_disk`` folder or a Hub
    dataset ID (see ``sources``). Every row of every part is checked before anything is returned; all problems found
    (the first ``MAX_REPORTED_ISSUES`` spelled out) are raised together as one ``DatasetError``. Without validation
    files, a seeded ``val_fraction`` of the training rows is held out (see ``split.num_val_rows``).
    ``max_val_examples`` caps validation rows with a seeded subset. ``columns`` maps field names onto the data's
    column names; ``train_split``/``val_split`` pick splits of a saved folder or Hub dataset.
    """
    return load_mixture([DatasetSource(path, columns=columns, train_split=train_split, val_split=val_split)],
                        val_fraction, seed, max_val_examples=max_val_examples)


def load_mixture(sources: Sequence[DatasetSource], val_fraction: float = 0.1, seed: int = 42, *,
                 max_val_examples: Optional[int] = None) -> DatasetSplits:
    """``load_dataset`` for several sources of one format, training rows drawn by weight (``mixing``).

    Each source is read and split as it would be alone (its validation files or split, else a seeded
    ``val_fraction`` of its rows, never trained on); the training rows are then drawn from each source by its
    weight, and validation keeps every source's validation rows as they are (unweighted; ``max_val_examples`` caps
    them together). One source gives exactly what ``load_dataset`` gives.
    """
    check_val_fraction(val_fraction)  # config mistakes: report them before reading any file
    column_maps = [ColumnMap(source.columns) if source.columns else None for source in sources]
    check_weights([source.weight for source in sources])
    issues = IssueLog()
    with _gc_paused():
        read = [_read_source(source, resolve_parts(source.path, source.train_split, source.val_split), columns,
                             issues) for source, columns in zip(sources, column_maps)]
    issues.raise_if_any()
    fmt = _one_format(read)
    val_sources = []
    for rows in read:
        if rows.parts.val:
            val_sources.append(_parts_name(rows.parts.val, "validation"))
        else:
            rows.train, rows.val = split_rows(rows.train, val_fraction, seed)
            val_sources.append(f"seeded split ({val_fraction:.0%} of training rows, seed {seed})")
    notes = [line for rows in read for line in _part_notes(rows, len(read) > 1)]
    if len(read) == 1:
        train, val_source, verbatim = read[0].train, val_sources[0], _verbatim(read[0])
    else:
        train = mix_rows([rows.train for rows in read], [s.weight for s in sources], seed)
        val_source = "each source's own: " + "; ".join(f"{r.source.path}: {v}" for r, v in zip(read, val_sources))
        notes += _mixture_notes(read, seed)
        verbatim = False
    return DatasetSplits(
        train=train,
        val=cap_rows([e for rows in read for e in rows.val], max_val_examples, seed),
        format=fmt.name,
        files=read[0].parts.files if len(read) == 1 else DatasetFiles(train=(), val=()),
        val_source=val_source,
        notes=tuple(notes),
        verbatim=verbatim,
    )


def load_examples(path: str | Path) -> tuple[str, list[Any]]:
    """Read and validate every row of one data file, as strictly as training data: ``(format name, examples)``.

    For held-out evaluation files. All problems found are raised together as one ``DatasetError`` naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise_one(str(path), f"evaluation file {what}", "Pass a JSONL file of held-out rows in the training format.")
    issues = IssueLog()
    with _gc_paused():
        shape, examples = _read_part(file_part(path), None, issues)
    issues.raise_if_any()
    return shape.format.name, examples


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while rows are parsed.

    Every row adds long-lived objects, so the collector's full passes rescan an ever larger heap: about a quarter of
    the time of loading a million rows. Parsing makes no reference cycles, so nothing is left uncollected.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- one source --------------------------------------------------------------------------------------------------

def _read_source(source: DatasetSource, parts: DatasetParts, columns: Optional[ColumnMap],
                 issues: IssueLog) -> Optional[_SourceRows]:
    """Every row of ``source``'s parts; ``None`` when problems were recorded that leave no format to check."""
    train_shapes, train = _read_parts(parts.train, columns, issues)
    val_shapes, val = _read_parts(parts.val, columns, issues)
    if not train_shapes:
        return None  # every training part failed: its issues say why
    fmt = train_shapes[0].format
    if val_shapes and val_shapes[0].format is not fmt and not issues.count:
        raise_one(parts.val[0].label, f"validation data is {val_shapes[0].format.name} but training data is "
                                      f"{fmt.name}", "Use one format for every file of a dataset.")
    return _SourceRows(source, parts, fmt, train, val, train_shapes + val_shapes)


def _read_parts(parts: tuple[DataPart, ...], columns: Optional[ColumnMap],
                issues: IssueLog) -> tuple[list[RowShape], list[Any]]:
    """Examples of every part, all of one format, and the shape of each part that yielded rows."""
    shapes: list[RowShape] = []
    examples: list[Any] = []
    for part in parts:
        shape, part_examples = _read_part(part, columns, issues)
        if shape is None:
            continue
        if shapes and shape.format is not shapes[0].format:
            issues.add(part.label, f"{part.kind} is {shape.format.name} data but earlier files are "
                                   f"{shapes[0].format.name}", "Use one format for every file of a dataset.")
        shapes.append(shape)
        examples += part_examples
    return shapes, examples


def _read_part(part: DataPart, columns: Optional[ColumnMap],
               issues: IssueLog) -> tuple[Optional[RowShape], list[Any]]:
    """Validate and parse one part, in row order; its shape is detected from its first JSON object.

    Returns ``None`` as the shape when the part cannot be used at all (empty, undecodable, refused, columns that
    the data does not have).
    """
    shape: Optional[RowShape] = None
    examples: list[Any] = []
    issues_before = issues.count
    for line in part.read(issues):
        value = line.value
        if columns is not None and isinstance(value, dict):
            value, missing = columns.apply(value)
            if missing:
                issues.add(line.location, missing, COLUMNS_HINT)
                if shape is None:  # the first row: the mapping does not fit this part at all
                    return None, []
                continue
        if shape is None and isinstance(value, dict):
            shape = detect_shape(value)
            if shape.refused:
                issues.add(line.location, shape.refused, shape.hint)
                return None, []
        if (example := _parse_row(line.location, value, shape or _FALLBACK, issues)) is not None:
            examples.append(example)
    if shape is None and issues.count == issues_before:  # no row and nothing undecodable: the part is empty
        issues.add(part.label, f"{part.kind} is empty (no rows)",
                   EMPTY_FILE_HINT if part.kind == "file" else EMPTY_SPLIT_HINT)
    return shape, examples


def _parse_row(location: str, value: Any, shape: RowShape, issues: IssueLog) -> Optional[Any]:
    """The example of one row, or ``None`` after recording why it is invalid."""
    if not isinstance(value, dict):
        issues.add(location, f"row must be a JSON object, got {_non_object(value)}",
                   JSON_LINES_HINT if _is_array_of_objects(value) else shape.hint)
        return None
    if (other := other_shape(value, shape)) is not None:
        if other.refused:
            issues.add(location, other.refused, other.hint)
        else:
            issues.add(location, f"row is {other.name} data but this file's first row is {shape.name} data",
                       _one_shape_hint(other, shape))
        return None
    problems = (shape.problems or shape.format.row_problems)(value)
    if not problems and shape.convert is not None:
        value = shape.convert(value)
        problems = shape.format.row_problems(value)
    for problem in problems:
        # A field missing beside other keys is most often the user's own column name for it.
        hint = f"{shape.hint} {COLUMNS_TIP}" if "is missing (keys found" in problem else shape.hint
        issues.add(location, problem, hint)
    return None if problems else shape.format.build_example(value, location)


def _one_shape_hint(other: RowShape, shape: RowShape) -> str:
    if other.format is shape.format:  # both convert to one format: separate files of one dataset will do
        return f"Keep one shape of row per file: put {other.rows} and {shape.rows} in separate files."
    return f"Keep one format per file: put {other.rows} and {shape.rows} in separate datasets."


def _is_array_of_objects(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _non_object(value: Any) -> str:
    if _is_array_of_objects(value):
        return f"a JSON array of {len(value)} objects (the rows of a .json file?)"
    return json_type_name(value)


def _verbatim(rows: _SourceRows) -> bool:
    """Every row is a line of a JSON Lines file, read as written (see ``DatasetSplits.verbatim``)."""
    return (not rows.source.columns and all(part.is_jsonl_file for part in rows.parts.train + rows.parts.val)
            and all(shape.convert is None for shape in rows.shapes))


# --- several sources ---------------------------------------------------------------------------------------------

def _one_format(read: list[_SourceRows]) -> DataFormat:
    fmt = read[0].format
    for i, rows in enumerate(read[1:], start=1):
        if rows.format is not fmt:
            raise_one(str(rows.source.path), f"dataset.mix[{i}] is {rows.format.name} data but dataset.mix[0] "
                                             f"({read[0].source.path}) is {fmt.name} data", MIX_FORMATS_HINT)
    return fmt


def _part_notes(rows: _SourceRows, mixed: bool) -> list[str]:
    prefix = f"{rows.source.path}: " if mixed else ""
    notes = []
    for what, parts in (("training", rows.parts.train), ("validation", rows.parts.val)):
        if parts:
            notes.append(f"{prefix}{_parts_name(parts, what)}: " + ", ".join(p.label for p in parts))
    if rows.parts.ignored:
        notes.append(f"{prefix}ignored: " + ", ".join(rows.parts.ignored))
    converted = sorted({f"{s.rows} -> {s.format.name}" for s in rows.shapes if s.convert is not None})
    if converted or rows.source.columns:
        mapped = ", ".join(f"{field}={column}" for field, column in (rows.source.columns or {}).items())
        notes.append(prefix + "; ".join(converted + ([f"columns mapped: {mapped}"] if mapped else [])))
    return notes


def _parts_name(parts: tuple[DataPart, ...], what: str) -> str:
    """``training files`` / ``validation split``: what the parts of one split are."""
    return f"{what} files" if parts[0].kind == "file" else f"{what} split"


def _mixture_notes(read: list[_SourceRows], seed: int) -> list[str]:
    weights = [rows.source.weight for rows in read]
    counts = mixture_counts([len(rows.train) for rows in read], weights)
    lines = [f"mixture of {len(read)} datasets, training rows drawn by weight once per job (seed {seed}):"]
    for rows, weight, count in zip(read, weights, counts):
        lines.append(f"  {rows.source.path}: weight {weight / sum(weights):.3g} -> {count} of its "
                     f"{len(rows.train)} training rows" + (" (repeated)" if count > len(rows.train) else ""))
    return lines
