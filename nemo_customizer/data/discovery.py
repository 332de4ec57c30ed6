"""Find the training and validation files of a dataset path (JSON Lines, JSON, CSV/TSV, Parquet, Arrow)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nemo_customizer.data.errors import raise_one

TRAIN_PREFIXES = ("training", "train")
VAL_PREFIXES = ("validation", "val")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
"""Files a directory's splits are made of; ``.parquet`` and ``.arrow`` need the ``[datasets]`` extra."""
EXPECTED_NAMES = ("training*.jsonl or train*.jsonl (required) and validation*.jsonl or val*.jsonl (optional); "
                  ".json, .csv, .tsv, .parquet and .arrow files count as well")
SAVED_DATASET_FILES = (("dataset_dict.json",), ("state.json", "dataset_info.json"))
"""What ``DatasetDict.save_to_disk`` / ``Dataset.save_to_disk`` leave in a folder."""


@dataclass(frozen=True)
class DatasetFiles:
    """The files a dataset path resolved to, each list sorted by name."""

    train: tuple[Path, ...]
    val: tuple[Path, ...]
    """Empty when the dataset has no validation file (a seeded split is held out of ``train`` instead)."""
    ignored: tuple[Path, ...] = ()
    """Other data files in the directory (e.g. ``test.jsonl``), listed so the job log can mention them."""


def discover_files(path: str | Path) -> DatasetFiles:
    """Resolve ``path`` (a data file, or a directory of split files) to its train/validation files.

    A directory must hold ``training*``/``train*`` files and may hold ``validation*``/``val*`` files (names compared
    case-insensitively), each of a ``DATA_SUFFIXES`` type. When it has no training file but exactly one other data
    file, that file is the training file; anything more ambiguous raises ``DatasetError``.
    """
    path = Path(path)
    if not path.exists():
        what = "is a broken symbolic link (or a link loop)" if path.is_symlink() else "does not exist"
        raise_one(str(path), f"dataset path {what}", "Pass a data file or a directory holding train*.jsonl.")
    if path.is_file():
        return DatasetFiles(train=(path,), val=())
    if not path.is_dir():  # a pipe or a device: files are read more than once, and a pipe would block
        raise_one(str(path), "dataset path is not a regular file or a directory",
                  "Pass a data file or a directory holding train*.jsonl.")
    try:
        entries = sorted(path.iterdir())
    except OSError as e:
        raise_one(str(path), f"cannot list the directory: {e.strerror or e}",
                  "Check the directory's permissions, then run again.")
    # Every data file entry that is not a directory counts, so a broken link or an unreadable file named train.jsonl
    # is reported by the reader instead of silently skipped. Hidden files (editor backups, macOS "._train.jsonl"
    # resource forks) are never data.
    data = [p for p in entries if p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith(".") and not p.is_dir()]
    train = tuple(p for p in data if _has_prefix(p, TRAIN_PREFIXES))
    val = tuple(p for p in data if _has_prefix(p, VAL_PREFIXES))
    other = tuple(p for p in data if p not in train and p not in val)
    if train:
        return DatasetFiles(train=train, val=val, ignored=other)
    if len(other) == 1:
        # Unambiguous: a single unnamed file next to (at most) validation files can only be the training data.
        return DatasetFiles(train=other, val=val)
    found = ", ".join(p.name for p in data) or "no *.jsonl files"
    raise_one(
        str(path),
        f"directory has no training file (found: {found})",
        f"Name the files {EXPECTED_NAMES}, or pass the path of a single data file.",
    )


def is_saved_dataset(path: Path) -> bool:
    """``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any(all((path / name).is_file() for name in names) for names in SAVED_DATASET_FILES)


def _has_prefix(path: Path, prefixes: tuple[str, ...]) -> bool:
    return path.name.lower().startswith(prefixes)
