"""``load_dataset``: dataset path -> validated train/validation examples, or one ``DatasetError`` listing problems."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from nemo_customizer.data.discovery import DatasetFiles, discover_files
from nemo_customizer.data.errors import IssueLog, raise_one
from nemo_customizer.data.formats import FORMATS, PROMPT_COMPLETION, DataFormat, detect_format
from nemo_customizer.data.jsonl import JSON_LINES_HINT, JsonLine, json_type_name, read_jsonl
from nemo_customizer.data.split import cap_rows, check_val_fraction, split_rows

EMPTY_FILE_HINT = "Add rows (one JSON object per line) or remove the file."


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset: validated examples of one format, and where they came from."""

    train: list[Any]
    """Examples of ``format`` (``PromptCompletion``, ``Conversation`` or ``PreferenceExample``), in file order."""
    val: list[Any]
    format: str
    """Name of the detected ``DataFormat`` (``"prompt_completion"``, ``"chat"`` or ``"preference"``)."""
    files: DatasetFiles
    val_source: str
    """Where ``val`` came from, e.g. ``"validation files"`` or ``"seeded split (10% of training rows, seed 42)"``."""

    def describe(self) -> str:
        """A few lines for the job log: files, format, row counts, where validation came from."""
        lines = [
            f"format: {self.format}; {len(self.train)} training rows, {len(self.val)} validation rows "
            f"({self.val_source})",
            "training files: " + ", ".join(str(p) for p in self.files.train),
        ]
        if self.files.val:
            lines.append("validation files: " + ", ".join(str(p) for p in self.files.val))
        if self.files.ignored:
            lines.append("ignored files: " + ", ".join(str(p) for p in self.files.ignored))
        return "\n".join(lines)


def load_dataset(
    path: str | Path, val_fraction: float = 0.1, seed: int = 42, *, max_val_examples: Optional[int] = None
) -> DatasetSplits:
    """Discover, read and validate every row of the dataset at ``path``; hold out validation rows if needed.

    ``path`` is a JSONL file or a directory (see ``discover_files``). Every row of every file is checked before
    anything is returned; all problems found (the first ``MAX_REPORTED_ISSUES`` spelled out) are raised together as
    one ``DatasetError``. Without validation files, a seeded ``val_fraction`` of the training rows is held out (see
    ``split.num_val_rows``). ``max_val_examples`` caps validation rows with a seeded subset.
    """
    check_val_fraction(val_fraction)  # a config mistake: report it before reading any file
    files = discover_files(path)
    issues = IssueLog()
    with _gc_paused():
        train_format, train = _read_files(files.train, issues)
        val_format, val = _read_files(files.val, issues)
    issues.raise_if_any()
    if val_format is not None and val_format is not train_format:
        raise_one(
            str(files.val[0]),
            f"validation data is {val_format.name} but training data is {train_format.name}",
            "Use one format for every file of a dataset.",
        )

    if files.val:
        val_source = "validation files"
    else:
        train, val = split_rows(train, val_fraction, seed)
        val_source = f"seeded split ({val_fraction:.0%} of training rows, seed {seed})"
    return DatasetSplits(
        train=train,
        val=cap_rows(val, max_val_examples, seed),
        format=train_format.name,
        files=files,
        val_source=val_source,
    )


def load_examples(path: str | Path) -> tuple[str, list[Any]]:
    """Read and validate every row of one JSONL file, as strictly as training data: ``(format name, examples)``.

    For held-out evaluation files. All problems found are raised together as one ``DatasetError`` naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise_one(str(path), f"evaluation file {what}", "Pass a JSONL file of held-out rows in the training format.")
    issues = IssueLog()
    with _gc_paused():
        fmt, examples = _read_file(path, issues)
    issues.raise_if_any()
    return fmt.name, examples


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


def _read_files(paths: tuple[Path, ...], issues: IssueLog) -> tuple[Optional[DataFormat], list[Any]]:
    """Examples of every file in ``paths``, all of one format (``None`` when no file yielded rows)."""
    split_format: Optional[DataFormat] = None
    examples: list[Any] = []
    for path in paths:
        file_format, file_examples = _read_file(path, issues)
        if file_format is None:
            continue
        if split_format is not None and file_format is not split_format:
            issues.add(str(path), f"file is {file_format.name} data but earlier files are {split_format.name}",
                       "Use one format for every file of a dataset.")
        split_format = split_format or file_format
        examples += file_examples
    return split_format, examples


def _read_file(path: Path, issues: IssueLog) -> tuple[Optional[DataFormat], list[Any]]:
    """Validate and parse one file, in line order; its format is detected from its first JSON object.

    Returns ``None`` as the format when the file cannot be used at all (empty, undecodable, unsupported format).
    """
    fmt: Optional[DataFormat] = None
    examples: list[Any] = []
    issues_before = issues.count
    for line in read_jsonl(path, issues):
        if fmt is None and isinstance(line.value, dict):
            fmt = detect_format(line.value)
            if fmt.unsupported:
                issues.add(line.location, f"{fmt.name} data is not supported yet", fmt.unsupported)
                return None, []
        if (example := _parse_line(line, fmt or PROMPT_COMPLETION, issues)) is not None:
            examples.append(example)
    if fmt is None and issues.count == issues_before:  # no row and nothing undecodable: the file is empty
        issues.add(str(path), "file is empty (no rows)", EMPTY_FILE_HINT)
    return fmt, examples


def _parse_line(line: JsonLine, fmt: DataFormat, issues: IssueLog) -> Optional[Any]:
    """The example on ``line``, or ``None`` after recording why it is invalid."""
    if not isinstance(line.value, dict):
        issues.add(line.location, f"row must be a JSON object, got {_non_object(line.value)}",
                   JSON_LINES_HINT if _is_array_of_objects(line.value) else fmt.row_hint)
        return None
    if (row_format := _other_format(line.value, fmt)) is not None:
        issues.add(line.location, f"row is {row_format.name} data but this file's first row is {fmt.name} data",
                   f"Keep one format per file: put {_plural(row_format)} and {_plural(fmt)} in separate datasets.")
        return None
    problems = fmt.row_problems(line.value)
    for problem in problems:
        issues.add(line.location, problem, fmt.row_hint)
    return None if problems else fmt.build_example(line.value, line.location)


def _other_format(row: dict[str, Any], fmt: DataFormat) -> Optional[DataFormat]:
    """The format ``row`` positively looks like when that is not ``fmt``: the row does not belong in this file.

    The last format is the fallback that accepts anything, so only a row matching another format makes a mixed file;
    other rows get their own format's field errors. (``detect_format`` without its generator: this runs per row.)
    """
    for other in FORMATS[:-1]:
        if other.matches(row):
            return None if other is fmt else other
    return None


_ROWS_OF = {"prompt_completion": "prompt/completion rows", "preference": "preference pairs"}


def _plural(fmt: DataFormat) -> str:
    """What a format's rows are called in messages: "chat rows", "preference pairs"."""
    return _ROWS_OF.get(fmt.name, f"{fmt.name} rows")


def _is_array_of_objects(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _non_object(value: Any) -> str:
    if _is_array_of_objects(value):
        return f"a JSON array of {len(value)} objects (the rows of a .json file?)"
    return json_type_name(value)
