"""What a dataset path names, as readable parts: files by type, the splits of a ``save_to_disk`` folder or of a Hub
dataset.

- a file or a directory of split files (``discovery``): ``.jsonl`` and files of unknown type are read as JSON Lines
  (``jsonl``), ``.json`` as an array or JSON Lines (``json_documents``), ``.csv``/``.tsv`` with Python's ``csv``
  (``csv_files``), ``.parquet``/``.arrow`` with ``pyarrow`` (``hf_datasets``, the ``[datasets]`` extra);
- a folder written by ``save_to_disk``, or a Hub dataset ID ``org/name[:config]`` where no such path exists: its
  splits (``hf_datasets``). The training split is ``train_split`` or the one split named ``train*``/``training*``
  (a dataset of one split: that split); validation is ``val_split`` or the one named ``validation*``/``val*``, if
  any. Other splits (``test``) are listed as ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from nemo_customizer.data import hf_datasets
from nemo_customizer.data.csv_files import DELIMITERS, read_csv_file
from nemo_customizer.data.discovery import (TRAIN_PREFIXES, VAL_PREFIXES, DatasetFiles, discover_files,
                                            is_saved_dataset)
from nemo_customizer.data.errors import IssueLog, raise_one
from nemo_customizer.data.json_documents import read_json_file
from nemo_customizer.data.jsonl import JsonLine, read_jsonl

SPLIT_KEYS = "dataset.train_split / dataset.val_split (or train_split / val_split of a dataset.mix entry)"


@dataclass(frozen=True)
class DataPart:
    """One readable piece of a dataset: a file, or one split of a ``datasets`` dataset."""

    label: str
    """How the job log and messages name it: the file's path, or ``SOURCE split NAME``."""
    read: Callable[[IssueLog], Iterator[JsonLine]]
    """Yields its rows in order (``JsonLine``: location and value); problems go to the ``IssueLog``."""
    kind: str = "file"
    """``file`` or ``split``, for messages ("file is empty")."""
    path: Optional[Path] = None
    """The file of a file part."""

    @property
    def is_jsonl_file(self) -> bool:
        """A file read line by line as JSON Lines (what the dataset store copies byte for byte)."""
        return self.path is not None and _reader_of(self.path) is read_jsonl


@dataclass(frozen=True)
class DatasetParts:
    """A dataset path resolved: the parts of each split, in order."""

    train: tuple[DataPart, ...]
    val: tuple[DataPart, ...]
    ignored: tuple[str, ...] = ()
    """Other files or splits (``test.jsonl``, a ``test`` split), listed so the job log can mention them."""
    files: DatasetFiles = DatasetFiles(train=(), val=())
    """The files, for a file or a directory of files (empty for a saved folder or a Hub dataset)."""


def resolve_parts(path: str | Path, train_split: Optional[str] = None,
                  val_split: Optional[str] = None) -> DatasetParts:
    """The parts of the dataset at ``path`` (see the module docstring); a ``DatasetError`` when there is none.

    ``train_split``/``val_split`` pick splits of a saved folder or Hub dataset; a dataset of files has none.
    """
    local = Path(path)
    if not local.exists() and not local.is_symlink() and hf_datasets.is_hub_id(str(path)):
        return _split_parts(str(path), hf_datasets.load_hub_splits(str(path)), train_split, val_split)
    if is_saved_dataset(local):
        return _split_parts(str(local), hf_datasets.load_saved_splits(local), train_split, val_split)
    if train_split is not None or val_split is not None:
        raise_one(str(path), "train_split/val_split name splits of a save_to_disk folder or a Hub dataset, but this "
                             "dataset is files", f"Unset {SPLIT_KEYS}, and name the files train*/validation*.")
    files = discover_files(local)
    return DatasetParts(train=tuple(map(file_part, files.train)), val=tuple(map(file_part, files.val)),
                        ignored=tuple(str(p) for p in files.ignored), files=files)


def file_part(path: Path) -> DataPart:
    """The part that reads file ``path`` with the reader of its type."""
    reader = _reader_of(path)
    return DataPart(label=str(path), read=lambda issues: reader(path, issues), path=path)


def _reader_of(path: Path) -> Callable[[Path, IssueLog], Iterator[JsonLine]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_json_file
    if suffix in DELIMITERS:
        return read_csv_file
    if suffix in hf_datasets.TABLE_FILES:
        return hf_datasets.read_table_file
    return read_jsonl  # .jsonl, and any single file passed by name, as before other types were read


def _split_parts(source: str, splits: dict[str, Any], train_split: Optional[str],
                 val_split: Optional[str]) -> DatasetParts:
    names = list(splits)
    if names == [""]:  # one Dataset, saved without split names
        if train_split is not None or val_split is not None:
            raise_one(source, "train_split/val_split name splits, but this folder holds one dataset without splits",
                      f"Unset {SPLIT_KEYS}.")
        return DatasetParts(train=(_split_part(source, "", splits[""]),), val=())
    train = _pick(source, names, train_split, TRAIN_PREFIXES, "training", required=True)
    val = _pick(source, names, val_split, VAL_PREFIXES, "validation", required=False, taken=train)
    ignored = tuple(f"{source} split {n}" for n in names if n not in (train, val))
    return DatasetParts(train=(_split_part(source, train, splits[train]),),
                        val=(_split_part(source, val, splits[val]),) if val else (), ignored=ignored)


def _pick(source: str, names: list[str], chosen: Optional[str], prefixes: tuple[str, ...], what: str,
          required: bool, taken: Optional[str] = None) -> Optional[str]:
    """The split named ``chosen``, else the one whose name starts with ``prefixes`` (see the module docstring);
    never ``taken`` (the training split, when picking validation)."""
    shown = ", ".join(names)
    if chosen is not None:
        if chosen not in names or chosen == taken:
            why = "is the training split" if chosen == taken else f"is not one (its splits: {shown})"
            raise_one(source, f"cannot use split {chosen!r} for {what}: it {why}", f"Set {SPLIT_KEYS} to another.")
        return chosen
    candidates = [n for n in names if n.lower().startswith(prefixes) and n != taken]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates and required and len(names) == 1:
        return names[0]
    if candidates or required:
        why = f"several splits could be the {what} split" if candidates else f"no split is named as a {what} split"
        raise_one(source, f"{why} (its splits: {shown})", f"Name the {what} split with {SPLIT_KEYS}.")
    return None


def _split_part(source: str, name: str, dataset: Any) -> DataPart:
    label = f"{source} split {name}" if name else source
    return DataPart(label=label, read=lambda issues: hf_datasets.split_rows(dataset, label, issues), kind="split")
