"""scripts/dpo_benchmark.py on the CPU: our DPO row (and TRL's where ``trl`` imports) from a two-step smoke run of
the SmolLM2 architecture with random weights."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
SMOKE = ["--device", "cpu", "--model", "smollm2-135m-instruct", "--steps", "2", "--warmup", "1", "--prompt", "12",
         "--completion", "8", "--pairs-per-step", "2", "--micro-batch", "1"]
FIELDS = {"impl", "model", "mode", "pairs_s", "tok_s", "step_ms", "peak_gb", "ref_pass_s", "reference", "card"}


def _main(argv):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import dpo_benchmark
    finally:
        sys.path.remove(str(SCRIPTS))
    return dpo_benchmark.main(argv)


def _rows(path: pathlib.Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_our_row_on_the_cpu(tmp_path):
    out = tmp_path / "dpo.jsonl"
    assert _main([*SMOKE, "--impl", "ours", "--out", str(out)]) == 0
    (row,) = _rows(out)
    assert FIELDS <= row.keys() and row["impl"] == "nemo_customizer" and row["card"] == "cpu"
    assert row["pairs_s"] > 0 and row["ref_pass_s"] > 0 and row["reference"] == "precomputed"
    assert row["tok_s"] == pytest.approx(row["pairs_s"] * (12 + 2 * 8), rel=0.01)
    assert row["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step


@pytest.mark.skipif(importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None,
                    reason="TRL's row needs trl and datasets (pip install --no-deps trl)")
def test_trls_row_on_the_cpu(tmp_path):
    out = tmp_path / "dpo.jsonl"
    assert _main([*SMOKE, "--impl", "trl", "--out", str(out)]) == 0
    (row,) = _rows(out)
    assert FIELDS <= row.keys() and row["impl"] == "trl" and "skipped" not in row
    assert row["pairs_s"] > 0 and row["ref_pass_s"] > 0 and row["losses"][0] == pytest.approx(0.6931, abs=1e-3)
