"""The datasets a job's ``dataset`` config names, as ``DatasetSource``s for ``load_mixture``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from nemo_customizer.data.loading import DatasetSource
from nemo_customizer.data.store import resolve_dataset_path

if TYPE_CHECKING:
    from nemo_customizer.config.schema import ColumnsConfig, DatasetConfig


def dataset_sources(dataset: DatasetConfig) -> list[DatasetSource]:
    """``dataset.path`` (weight 1), or each entry of ``dataset.mix``; stored names resolved to their folders.

    A missing path that is no stored name and no Hub ID is a ``DatasetError`` here, before anything is read.
    """
    entries = dataset.mix or [dataset]
    return [DatasetSource(path=resolve_dataset_path(entry.path, dataset.store_dir),
                          weight=getattr(entry, "weight", 1.0), columns=column_map(entry.columns),
                          train_split=entry.train_split, val_split=entry.val_split) for entry in entries]


def column_map(columns: ColumnsConfig) -> dict[str, str]:
    """``{field: column}`` of the fields that ``columns`` maps."""
    return {name: column for name, column in dataclasses.asdict(columns).items() if column is not None}


def dataset_name(dataset: DatasetConfig) -> str:
    """How messages name the job's data: its path, or its mixture's paths."""
    if dataset.mix:
        return "dataset.mix (" + ", ".join(entry.path for entry in dataset.mix) + ")"
    return dataset.path
