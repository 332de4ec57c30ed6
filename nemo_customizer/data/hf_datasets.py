"""Data read through the optional ``[datasets]`` extra (``pip install 'nemo_customizer[datasets]'``): Parquet and
Arrow files, folders written by ``save_to_disk``, and Hugging Face Hub dataset IDs.

Files are read with ``pyarrow`` (which ``datasets`` installs) one record batch at a time: nothing is copied into a
cache, and memory stays one batch of rows. Saved folders open with ``datasets.load_from_disk`` (memory-mapped, no
copy); Hub IDs with ``datasets.load_dataset``, downloaded and cached as that library caches them, so a dataset loaded
once is found again offline. Nothing here imports either library until such data is read.

Rows are located as ``FILE row N`` or ``SOURCE split NAME row N`` (1-based). Arrow gives each struct in a list the
keys of all of them (a message without ``tool_calls`` gets ``"tool_calls": null``), so nulls below a row's top level
are dropped: rows read as the JSON they were written from. A null top-level column stays (``got null`` in messages).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from nemo_customizer.data.discovery import DATA_SUFFIXES
from nemo_customizer.data.errors import IssueLog, raise_one
from nemo_customizer.data.jsonl import JsonLine

EXTRA = "pip install 'nemo_customizer[datasets]'"
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?")
"""``org/name``, or ``org/name:config`` for one of a Hub dataset's configurations (subsets)."""
TABLE_FILES = {".parquet": "Parquet", ".arrow": "Arrow"}
ROWS_PER_BATCH = 1024
_TABLE_HINT = "Check that the file is complete and was written as {what} (e.g. by pandas or datasets), then run again."


def is_hub_id(text: str) -> bool:
    """``text`` has a Hub ID's form and does not look like a local path that is missing.

    ``data/train.jsonl`` (a data file's suffix) and ``data/train`` (an existing folder ``data``) are local paths.
    """
    match = HUB_ID.fullmatch(text)
    if match is None or Path(match["repo"]).suffix.lower() in DATA_SUFFIXES:
        return False
    return not Path(match["repo"].split("/", 1)[0]).exists()


# --- Parquet and Arrow files -----------------------------------------------------------------------------------------

def read_table_file(path: Path, issues: IssueLog) -> Iterator[JsonLine]:
    """Every row of a Parquet or Arrow (IPC file or stream, as ``datasets`` writes) file, as ``{column: value}``."""
    what = TABLE_FILES[path.suffix.lower()]
    pa = _import("pyarrow", str(path), f"reading {what} files")
    batches = _parquet_batches(path) if what == "Parquet" else _arrow_batches(pa, path)
    try:
        yield from _rows(batches, f"{path} row ")
    except (OSError, pa.ArrowException) as e:
        issues.add(str(path), f"cannot read the file as {what}: {_first_line(e)}", _TABLE_HINT.format(what=what))


def _parquet_batches(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH)


def _arrow_batches(pa: Any, path: Path) -> Iterator[Any]:
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:  # not the IPC file format: the stream format that datasets writes
            source.seek(0)
            yield from pa.ipc.open_stream(source)
            return
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


# --- save_to_disk folders and Hub IDs --------------------------------------------------------------------------------

def load_saved_splits(path: Path) -> dict[str, Any]:
    """The splits of a folder written by ``Dataset.save_to_disk`` (one split, named ``""``) or
    ``DatasetDict.save_to_disk``."""
    datasets = _import("datasets", str(path), "reading a folder written by save_to_disk")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise_one(str(path), f"cannot load the folder written by save_to_disk: {_first_line(e)}",
                  "Check that the folder is complete (save_to_disk writes state.json, dataset_info.json and "
                  "data-*.arrow files, or a dataset_dict.json and a folder per split).")
    return _splits(datasets, loaded)


def load_hub_splits(hub_id: str) -> dict[str, Any]:
    """Every split of Hub dataset ``org/name`` (``org/name:config``: of that configuration), downloaded or cached.

    Offline (``HF_DATASETS_OFFLINE=1``/``HF_HUB_OFFLINE=1``, or no network) a dataset not in the cache is a
    ``DatasetError`` holding the command that fetches it.
    """
    match = HUB_ID.fullmatch(hub_id)
    repo, config = match["repo"], match["config"]
    datasets = _import("datasets", hub_id, "loading a Hugging Face Hub dataset")
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        loaded = datasets.load_dataset(repo, config)
    except datasets.exceptions.DatasetNotFoundError:
        raise_one(hub_id, f"no dataset {repo} on the Hugging Face Hub, or it is private or gated",
                  "Check the ID (org/name, as in huggingface.co/datasets/org/name); for a private or gated dataset, "
                  "accept its terms on the Hub and log in with `hf auth login`.")
    except (ConnectionError, OSError) as e:  # offline mode, no network, a Hub that does not answer
        problem = ("Hugging Face offline mode is on (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE) and the dataset is not "
                   "in the datasets cache" if offline else f"cannot download it from the Hugging Face Hub "
                                                           f"({_first_line(e)})")
        raise_one(hub_id, problem, fetch_hint(repo, config))
    except ValueError as e:  # an unknown configuration name, a dataset that needs one
        raise_one(hub_id, f"cannot load it: {_first_line(e)}",
                  "Name one of its configurations as org/name:CONFIG (see the dataset's page on the Hub).")
    return _splits(datasets, loaded)


def fetch_hint(repo: str, config: str | None) -> str:
    """The exact command that saves Hub dataset ``repo`` to a folder, and how to use that folder."""
    folder = repo.replace("/", "--") + (f"--{config}" if config else "")
    name = f"'{repo}'" + (f", '{config}'" if config else "")
    return (f"Fetch it where huggingface.co is reachable: python -c \"import datasets; "
            f"datasets.load_dataset({name}).save_to_disk('{folder}')\", then pass dataset.path={folder} (copy the "
            f"folder to this machine first if that was another one).")


def split_rows(dataset: Any, label: str, issues: IssueLog) -> Iterator[JsonLine]:
    """Every row of one split (a ``datasets.Dataset``), located as ``LABEL row N``."""
    import pyarrow as pa

    try:
        yield from _rows(dataset.with_format("arrow").iter(batch_size=ROWS_PER_BATCH), f"{label} row ")
    except (OSError, pa.ArrowException) as e:
        issues.add(label, f"cannot read the split: {_first_line(e)}", "Save or download the dataset again.")


def _splits(datasets: Any, loaded: Any) -> dict[str, Any]:
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}


# --- rows ------------------------------------------------------------------------------------------------------------

def _rows(batches: Iterable[Any], prefix: str) -> Iterator[JsonLine]:
    number = 0
    for batch in batches:  # a pyarrow RecordBatch or Table
        for row in batch.to_pylist():
            number += 1
            yield JsonLine(f"{prefix}{number}", {key: _without_nulls(value) for key, value in row.items()})


def _without_nulls(value: Any) -> Any:
    """``value`` without null-valued keys in any object inside it (the keys Arrow's struct types added)."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _import(module: str, location: str, what: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise_one(location, f"{what} needs the optional `datasets` extra, which is not installed",
                  f"Install it with {EXTRA} (or pip install datasets).")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
