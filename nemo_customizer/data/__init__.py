"""Datasets (prompt/completion, chat, preference pairs): find files, validate rows, tokenize with loss masks, batch,
collate.

Files: ``discovery`` (which files), ``sources`` (a path as readable parts: files by type, splits of a saved folder
or Hub dataset), ``jsonl`` (read lines, strict JSON), ``json_documents`` (.json arrays), ``csv_files``,
``hf_datasets`` (Parquet, Arrow, save_to_disk folders, Hub IDs: the ``[datasets]`` extra), ``columns``
(``dataset.columns``), ``shapes`` (Alpaca, ShareGPT, plain text rows), ``formats/`` (one module per row format),
``loading`` (``load_dataset``, ``load_mixture``), ``mixing`` (mixing weights), ``split`` (seeded validation
hold-out), ``truncation`` (the length rule),
``tokenization`` (``tokenize_examples``), ``batching`` (shuffle and DP sharding), ``packing`` (bins of examples
and packed batch sizes), ``collate`` (tensors, padded or packed),
``errors`` (``DatasetError``).
"""

from nemo_customizer.data.batching import (
    epoch_order,
    iterate_micro_batches,
    iterate_validation_micro_batches,
    num_micro_batches,
    steps_per_epoch,
    validation_steps,
)
from nemo_customizer.data.collate import (PADDING_PAIR, Batch, PackedBatch, PairBatch, collate, collate_packed,
                                          collate_packed_pairs, collate_pairs)
from nemo_customizer.data.discovery import DatasetFiles, discover_files
from nemo_customizer.data.errors import DatasetError
from nemo_customizer.data.examples import PADDING_EXAMPLE, TokenizedExample, TokenizedPair
from nemo_customizer.data.formats import PromptCompletion
from nemo_customizer.data.loading import DatasetSource, DatasetSplits, load_dataset, load_mixture
from nemo_customizer.data.packing import PackingPlan, pack_examples, pack_lengths, plan_packing, plan_pair_packing
from nemo_customizer.data.tokenization import tokenize_examples
from nemo_customizer.data.truncation import TruncationStats

__all__ = [
    "PADDING_EXAMPLE",
    "PADDING_PAIR",
    "Batch",
    "DatasetError",
    "DatasetFiles",
    "DatasetSource",
    "DatasetSplits",
    "PackedBatch",
    "PackingPlan",
    "PairBatch",
    "PromptCompletion",
    "TokenizedExample",
    "TokenizedPair",
    "TruncationStats",
    "collate",
    "collate_packed",
    "collate_packed_pairs",
    "collate_pairs",
    "discover_files",
    "epoch_order",
    "iterate_micro_batches",
    "iterate_validation_micro_batches",
    "load_dataset",
    "load_mixture",
    "num_micro_batches",
    "pack_examples",
    "pack_lengths",
    "plan_packing",
    "plan_pair_packing",
    "steps_per_epoch",
    "tokenize_examples",
    "validation_steps",
]
