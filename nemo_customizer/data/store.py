"""The dataset store: upload (validate, report, keep a copy), list, show, delete, and resolve names to paths.

Layout: ``<store>/<name>/training.jsonl``, ``validation.jsonl`` (when the source had validation files) and
``dataset.json`` (name, source, format, row counts, created time, sha256s, the upload report). The store is
``store_dir``, else ``$NEMO_CUSTOMIZER_DATASETS``, else ``$NEMO_CUSTOMIZER_CACHE/datasets``, else
``~/.cache/nemo_customizer/datasets``. A dataset appears by one atomic rename of a finished folder, so there is
never half of one; hidden ``.<name>.*`` folders are work in progress (or left by a killed upload) and ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from nemo_customizer._cache import default_cache_dir
from nemo_customizer.data._store_files import (copy_rows, example_row, make_temp_dir, move_aside, publish, remove,
                                               write_rows)
from nemo_customizer.data._store_report import (DatasetReport, FileSummary, LengthHistogram, PairLengths,
                                                measure)
from nemo_customizer.data.errors import DatasetError
from nemo_customizer.data.hf_datasets import is_hub_id
from nemo_customizer.data.loading import DatasetSplits, load_dataset

if TYPE_CHECKING:
    from nemo_customizer.config import ModelConfig

DATASETS_ENV = "NEMO_CUSTOMIZER_DATASETS"
DEFAULT_MODEL = "smollm2-135m-instruct"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
TRAINING_FILE = "training.jsonl"
VALIDATION_FILE = "validation.jsonl"
METADATA_FILE = "dataset.json"
UPLOAD_HINT = "python -m nemo_customizer datasets upload PATH --name NAME"


@dataclasses.dataclass(frozen=True)
class StoredDataset:
    """One entry of ``list_datasets``: a summary read from its ``dataset.json``."""

    name: str
    path: Path
    format: str
    training_rows: int
    validation_rows: int
    created: str
    source: str
    content_sha256: str


def default_store_dir() -> Path:
    """The store: ``$NEMO_CUSTOMIZER_DATASETS``, else ``$NEMO_CUSTOMIZER_CACHE/datasets``, else the default below.

    The default is ~/.cache/nemo_customizer/datasets, next to the converted embedded checkpoints.
    """
    if os.environ.get(DATASETS_ENV):
        return Path(os.environ[DATASETS_ENV]).expanduser()
    return default_cache_dir() / "datasets"


def check_name(name: str) -> str:
    """``name`` if it is a valid dataset name, else a ``DatasetError`` stating the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DatasetError(f"invalid dataset name {name!r}: use {NAME_RULE}.")
    return name


def upload(
    path: str | os.PathLike[str],
    name: str,
    *,
    model: "str | ModelConfig" = DEFAULT_MODEL,
    store_dir: Optional[str | os.PathLike[str]] = None,
    overwrite: bool = False,
    model_overrides: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[str] = None,
) -> DatasetReport:
    """Validate every row of the dataset at ``path``, measure it with ``model``'s tokenizer, store a copy as ``name``.

    ``model`` is a model config name (``model_overrides`` such as ``{"checkpoint": "/ckpt"}`` adjust it) or a
    composed ``ModelConfig``; its tokenizer and ``max_seq_length`` give the token-length histogram and the rows that
    training would truncate or drop (preference data: pairs, with the lengths of their prompts and responses). Bad
    rows raise one ``DatasetError`` (file:line: field) before anything is written. An existing ``name`` is replaced
    only with ``overwrite=True``. JSON Lines rows are stored byte-for-byte (see ``_store_files.copy_rows`` for the
    whitespace that is normalized); other data (CSV, Parquet, a Hub dataset, Alpaca rows, ...) as the JSON Lines rows
    of its format.
    """
    store = Path(store_dir).expanduser() if store_dir is not None else default_store_dir()
    target = store / check_name(name)
    if not overwrite and _exists(target):
        raise _exists_error(name, store)
    splits = load_dataset(path, val_fraction=0.0)  # every row of training files in train, of validation files in val
    model_cfg = _model_config(model, model_overrides)
    tokenizer, model_cfg = _tokenizer(model_cfg, cache_dir)
    train = measure(splits.train, tokenizer, model_cfg.max_seq_length)
    val = measure(splits.val, tokenizer, model_cfg.max_seq_length)
    pairs = train.pair_parts + val.pair_parts
    pair_lengths = PairLengths.from_parts(pairs) if splits.format == "preference" else None

    tmp = make_temp_dir(store, name)
    try:
        stored, files = _store_rows(splits, path, tmp)
        report = DatasetReport(
            name=name, path=str(target), source=_source_name(path), format=splits.format, files=files,
            ignored_files=tuple(str(p) for p in splits.files.ignored),
            training_rows=len(splits.train), validation_rows=len(splits.val),
            model=model_cfg.name, max_seq_length=model_cfg.max_seq_length,
            lengths=LengthHistogram.from_lengths(train.lengths + val.lengths),
            training_fit=train.fit, validation_fit=val.fit,
            content_sha256=_manifest_sha256(stored), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            pair_lengths=pair_lengths,
        )
        _write_metadata(tmp / METADATA_FILE, report, stored)
        publish(tmp, target, overwrite=overwrite)
    except FileExistsError:
        raise _exists_error(name, store) from None  # another upload of this name finished first
    finally:
        remove(tmp)  # already gone when publish succeeded
    return report


def _store_rows(splits: DatasetSplits, path: str | os.PathLike[str],
                tmp: Path) -> tuple[dict[str, tuple[int, str]], tuple[FileSummary, ...]]:
    """Write the training (and validation) rows into ``tmp``: ``{file: (rows, sha256)}`` and a summary per source.

    JSON Lines files read as written are copied byte for byte; other data (other file types, saved folders, Hub
    datasets, converted rows) is written as the validated rows of its format, one JSON object per line.
    """
    if not splits.verbatim:
        stored = {TRAINING_FILE: write_rows(map(example_row, splits.train), tmp / TRAINING_FILE)}
        if splits.val:
            stored[VALIDATION_FILE] = write_rows(map(example_row, splits.val), tmp / VALIDATION_FILE)
        return stored, tuple(FileSummary(_source_name(path), split, splits.format, len(examples))
                             for split, examples in (("training", splits.train), ("validation", splits.val))
                             if examples)
    train_rows, train_sha = copy_rows(splits.files.train, tmp / TRAINING_FILE)
    stored = {TRAINING_FILE: (sum(train_rows), train_sha)}
    val_rows: list[int] = []
    if splits.files.val:
        val_rows, val_sha = copy_rows(splits.files.val, tmp / VALIDATION_FILE)
        stored[VALIDATION_FILE] = (sum(val_rows), val_sha)
    if (sum(train_rows), sum(val_rows)) != (len(splits.train), len(splits.val)):
        raise RuntimeError(f"copied {sum(train_rows)}+{sum(val_rows)} rows of {path} but validated "
                           f"{len(splits.train)}+{len(splits.val)}; please report this bug")
    return stored, tuple(FileSummary(str(p), split, splits.format, rows)
                         for split, paths, counts in (("training", splits.files.train, train_rows),
                                                      ("validation", splits.files.val, val_rows))
                         for p, rows in zip(paths, counts))


def _source_name(path: str | os.PathLike[str]) -> str:
    """A local path made absolute; a Hub dataset ID as it is."""
    local = Path(path)
    return str(local.resolve()) if local.exists() else str(path)


def list_datasets(store_dir: Optional[str | os.PathLike[str]] = None) -> list[StoredDataset]:
    """Every dataset in the store, sorted by name (an empty list when the store does not exist yet)."""
    store = Path(store_dir).expanduser() if store_dir is not None else default_store_dir()
    if not store.is_dir():
        return []
    found = []
    for folder in sorted(store.iterdir()):
        if not NAME_PATTERN.fullmatch(folder.name) or not (folder / METADATA_FILE).is_file():
            continue
        try:
            record = json.loads((folder / METADATA_FILE).read_text())
            found.append(StoredDataset(
                name=folder.name, path=folder, format=record["format"], training_rows=record["rows"]["training"],
                validation_rows=record["rows"]["validation"], created=record["created"], source=record["source"],
                content_sha256=record["content_sha256"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"skipping {folder}: unreadable {METADATA_FILE} ({err})", stacklevel=2)
    return found


def get_dataset(name: str, store_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """The folder of stored dataset ``name`` (load it with ``load_dataset`` or pass it as ``dataset.path``)."""
    store = Path(store_dir).expanduser() if store_dir is not None else default_store_dir()
    folder = store / check_name(name)
    if not (folder / METADATA_FILE).is_file():
        raise DatasetError(f"no stored dataset named {name!r} in {store} ({_stored_names(store)}); "
                           f"upload one with `{UPLOAD_HINT}`.")
    return folder


def dataset_report(name: str, store_dir: Optional[str | os.PathLike[str]] = None) -> DatasetReport:
    """The report ``upload`` made for stored dataset ``name`` (no tokenizer is loaded)."""
    folder = get_dataset(name, store_dir)
    try:
        return DatasetReport.from_dict(json.loads((folder / METADATA_FILE).read_text())["report"])
    except (ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{folder / METADATA_FILE}: unreadable ({err}); upload the dataset again.") from None


def delete_dataset(name: str, store_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """Remove stored dataset ``name``; returns the folder it was in. The name disappears in one rename."""
    folder = get_dataset(name, store_dir)
    remove(move_aside(folder, "deleted"))
    return folder


def resolve_dataset_path(path_or_name: str | os.PathLike[str],
                         store_dir: Optional[str | os.PathLike[str]] = None) -> Path | str:
    """``dataset.path`` → what ``load_dataset`` reads: an existing file or folder as is, else a stored dataset folder,
    else a Hugging Face Hub dataset ID (``org/name[:config]``, returned as the string).

    An existing path wins over a stored name. Anything else raises one ``DatasetError`` listing the stored names.
    """
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    store = Path(store_dir).expanduser() if store_dir is not None else default_store_dir()
    text = str(path_or_name)
    if NAME_PATTERN.fullmatch(text) and (store / text / METADATA_FILE).is_file():
        return store / text
    if is_hub_id(text):
        return text
    raise DatasetError(f"{text}: no such file or directory, and no stored dataset has that name "
                       f"(store {store}: {_stored_names(store)}). Pass a data file, a directory with train*.jsonl, "
                       f"a Hub dataset ID (org/name), or the name of a dataset uploaded with `{UPLOAD_HINT}`.")


def _model_config(model: "str | ModelConfig", overrides: Optional[Mapping[str, Any]]) -> "ModelConfig":
    from nemo_customizer.config import ConfigError, config_from_kwargs

    if not isinstance(model, str):
        if overrides:
            raise ConfigError("model_overrides applies to a model config name; set the fields on the ModelConfig.")
        return model
    return config_from_kwargs(config=model, **({"model": dict(overrides)} if overrides else {})).model


def _tokenizer(model: "ModelConfig", cache_dir: Optional[str]):
    """``model``'s tokenizer (an embedded checkpoint is converted once into the cache) and its resolved config."""
    from nemo_customizer.checkpoints.resolve import load_tokenizer, resolve_model

    resolved = resolve_model(model, cache_dir)
    return load_tokenizer(resolved.tokenizer_dir, resolved.config.chat_template), resolved.config


def _write_metadata(path: Path, report: DatasetReport, stored: Mapping[str, tuple[int, str]]) -> None:
    record = {
        "name": report.name,
        "source": report.source,
        "format": report.format,
        "rows": {"training": report.training_rows, "validation": report.validation_rows},
        "created": report.created,
        "content_sha256": report.content_sha256,
        "files": {file: {"rows": rows, "sha256": sha} for file, (rows, sha) in stored.items()},
        "report": report.to_dict(),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _manifest_sha256(stored: Mapping[str, tuple[int, str]]) -> str:
    """sha256 of the ``sha256sum``-style manifest of the stored files: one hash for the whole content."""
    manifest = "".join(f"{sha}  {file}\n" for file, (_, sha) in sorted(stored.items()))
    return hashlib.sha256(manifest.encode()).hexdigest()


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _exists_error(name: str, store: Path) -> DatasetError:
    return DatasetError(f"a dataset named {name!r} already exists in {store}; pass overwrite=True (--overwrite) to "
                        "replace it, or choose another name.")


def _stored_names(store: Path) -> str:
    names = [d.name for d in list_datasets(store)]
    return "stored: " + ", ".join(names) if names else "no datasets stored"
