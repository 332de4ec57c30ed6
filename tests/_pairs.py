"""Preference files for the DPO job tests, from the tiny classification task (``_tiny.write_classification_data``):
each prompt/completion row becomes a pair in the product's preference format whose chosen response is the row's
label and whose rejected one is the other label."""

from __future__ import annotations

import json
from pathlib import Path

OTHER_LABEL = {"yes": "no", "no": "yes"}


def write_preference_data(directory: Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> Path:
    """``training.jsonl`` and ``validation.jsonl`` of ``{"prompt", "chosen_response", "rejected_response"}`` rows."""
    from _tiny import write_classification_data

    write_classification_data(directory, n_train=n_train, n_val=n_val, seed=seed)
    for name in ("training.jsonl", "validation.jsonl"):
        rows = [json.loads(line) for line in (directory / name).read_text().splitlines()]
        (directory / name).write_text("".join(
            json.dumps({"prompt": row["prompt"], "chosen_response": row["completion"],
                        "rejected_response": OTHER_LABEL[row["completion"]]}) + "\n" for row in rows))
    return directory
