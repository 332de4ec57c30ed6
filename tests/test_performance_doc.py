"""docs/PERFORMANCE.md is what docs/performance/results.jsonl renders, and benchmark rows can be added to it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "performance_tables.py"


def _tables():
    return load_script("performance_tables")


def test_performance_doc_is_what_the_results_render():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_hand_edit_of_a_table_fails_the_check(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 8B LoRA r16 q,v |"))
    doc.write_text(text.replace(row, row.replace(" |", " | 1", 3), 1))  # a number edited by hand
    assert _tables().main(["--check", "--doc", str(doc)]) == 1


def _benchmark_output(tok_s: int) -> str:
    """What ``scripts/benchmark.py --baseline`` prints for one configuration: a card line, ours, the baseline."""
    ours = dict(impl="nemo_customizer", model="llama-3.2-1b-instruct", mode="lora-qv", seq=4096, packed=True, tp=1,
                sp=False, bins_per_micro_batch=1, tok_s=tok_s, tflops=500, mfu=0.506, peak_gb=6.9, step_ms=40.0,
                host_syncs={"total": 1}, compiled=True, cuda_graphs=True, activation_checkpointing=False,
                recompute_modules=[], step_timing="queued", attention="fa4", losses=[12.0],
                card="NVIDIA H100 80GB HBM3")
    baseline = dict(impl="hf+peft", model="llama-3.2-1b-instruct", mode="lora-qv", seq=4096, packed=False, rows=1,
                    tok_s=40000, tflops=300, mfu=0.3, peak_gb=14.9, step_ms=102.4, card="NVIDIA H100 80GB HBM3")
    return "card: NVIDIA H100 80GB HBM3  torch 2.11.0\n" + json.dumps(ours) + "\n" + json.dumps(baseline) + "\n"


def test_benchmark_rows_are_added_and_a_new_measurement_replaces_the_old(tmp_path):
    results, doc = tmp_path / "results.jsonl", tmp_path / "PERFORMANCE.md"
    shutil.copy(ROOT / "docs" / "performance" / "results.jsonl", results)
    before = len(results.read_text().splitlines())
    other_cards = [line for line in (ROOT / "docs" / "PERFORMANCE.md").read_text().splitlines()
                   if line.startswith("| 1B LoRA r16 q,v |") and "| H100 |" not in line]
    command = "python scripts/benchmark.py --packed --cuda-graphs --baseline"
    for tok_s in (90000, 100000):
        rows = tmp_path / f"rows-{tok_s}.jsonl"
        rows.write_text(_benchmark_output(tok_s))
        args = ["--add", str(rows), "--command", command, "--date", "2026-12-08", "--commit", "abc1234",
                "--results", str(results), "--doc", str(doc)]
        assert _tables().main(args) == 0
    added = [json.loads(line) for line in results.read_text().splitlines()[before:]]
    assert len(added) == 1  # the second run replaced the first: one row per configuration and card
    assert added[0]["card"] == "H100" and added[0]["tokens_per_s"] == 100000
    assert added[0]["baseline_tokens_per_s"] == 40000 and added[0]["commit"] == "abc1234"
    text = doc.read_text()
    assert "| 1B LoRA r16 q,v | H100 | 100,000 | 50.6% | 6.9 | 40,000 | 2.50× |" in text
    assert other_cards and all(line in text for line in other_cards)  # another card's row stays
    assert f"2026-12-08, H100, at `abc1234`: `{command}`" in text
    assert _tables().main(["--check", "--results", str(results), "--doc", str(doc)]) == 0


def test_equal_work_rows_go_to_their_own_table_beside_every_baseline(tmp_path):
    results, doc = tmp_path / "results.jsonl", tmp_path / "PERFORMANCE.md"
    shutil.copy(ROOT / "docs" / "performance" / "results.jsonl", results)
    printed = [json.loads(line) for line in _benchmark_output(30000).splitlines()[1:]]
    ours, plain = printed
    ours.update(model="llama-3.1-8b-instruct", work="equal", precision="fp8")
    plain.update(model="llama-3.1-8b-instruct", tok_s=12000)
    liger = dict(plain, impl="hf+peft+liger", tok_s=15000)
    failed = dict(impl="unsloth", model="llama-3.1-8b-instruct", mode="lora-qv", error="failed: no module")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in (ours, plain, liger, failed)))
    command = "python scripts/benchmark.py --equal-work --cuda-graphs --baseline hf-peft,liger,unsloth"
    assert _tables().main(["--add", str(rows), "--command", command, "--date", "2026-12-08", "--results",
                           str(results), "--doc", str(doc)]) == 0
    added = json.loads(results.read_text().splitlines()[-1])
    assert added["table"] == "equal-work" and added["precision"] == "fp8"
    assert (added["baseline_tokens_per_s"], added["liger_tokens_per_s"], added["unsloth_tokens_per_s"]) == \
        (12000, 15000, None)
    text = doc.read_text()
    assert "| 8B LoRA r16 q,v, FP8 frozen base | H100 | 30,000 | 50.6% | 6.9 | 12,000 | 15,000 | — | 2.00× |" in text


def test_a_profile_summary_is_recorded_beside_its_benchmark_row(tmp_path):
    results, doc = tmp_path / "results.jsonl", tmp_path / "PERFORMANCE.md"
    shutil.copy(ROOT / "docs" / "performance" / "results.jsonl", results)
    ours = json.loads(_benchmark_output(20000).splitlines()[1])
    ours.update(model="llama-3.1-8b-instruct", work="equal", step_ms=230.5)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ours) + "\n")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(dict(kernels_ms_per_step=221.0, idle_ms=4.5, categories={
        "GEMMs": dict(ms=180.25, share=0.816), "attention": dict(ms=25.0, share=0.113)})))
    command = "python scripts/benchmark.py --equal-work --cuda-graphs --profile DIR"
    assert _tables().main(["--add", str(rows), "--add-profile", str(summary), "--command", command, "--date",
                           "2026-12-08", "--results", str(results), "--doc", str(doc)]) == 0
    added = json.loads(results.read_text().splitlines()[-1])
    assert added["table"] == "step-profile" and added["kernels_ms"] == 221.0
    assert added["parts"][:2] == [["GEMMs", 180.25], ["attention", 25.0]]
    assert ("| 8B LoRA r16 q,v, equal work | 230.5 ms | 221.0 ms | GEMMs 180.25, attention 25.0, GPU idle (3 steps, "
            "between steps included) 4.5 |") in doc.read_text()


def test_fp8_numerics_output_is_recorded_as_one_row(tmp_path):
    results, doc = tmp_path / "results.jsonl", tmp_path / "PERFORMANCE.md"
    shutil.copy(ROOT / "docs" / "performance" / "results.jsonl", results)
    common = dict(model="llama-3.1-8b-instruct", layers=None, targets=["q_proj", "v_proj"], seq=2048, against="bf16",
                  card="NVIDIA H100 80GB HBM3")
    printed = [dict(measure="logits", **common, max_rel=0.0512, rms_rel=0.0301, loss_reference=11.9, loss_fp8=11.8),
               dict(measure="lora_grads", **common, groups={"q_proj.lora_A": dict(max=0.3, median=0.12)}),
               dict(measure="loss_curve", **common, steps=20, reference=[12.0, 11.0], fp8=[12.01, 11.02],
                    max_step_rel=0.0018)]
    rows = tmp_path / "numerics.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in printed))
    assert _tables().main(["--add", str(rows), "--command", "python scripts/fp8_numerics.py", "--date", "2026-12-08",
                           "--results", str(results), "--doc", str(doc)]) == 0
    added = json.loads(results.read_text().splitlines()[-1])
    assert (added["table"], added["card"], added["logits_max_rel"]) == ("fp8-numerics", "H100", 0.0512)
    assert ("| 8B-shaped, LoRA q_proj,v_proj | H100 | bf16 | 2,048 | 0.051 / 0.030 | q_proj.lora_A 0.12 | "
            "0.0018 over 20 steps |") in doc.read_text()


def test_an_fp8_row_sits_beside_the_bf16_row_of_its_configuration(tmp_path):
    results, doc = tmp_path / "results.jsonl", tmp_path / "PERFORMANCE.md"
    shutil.copy(ROOT / "docs" / "performance" / "results.jsonl", results)
    for tok_s, precision in ((90000, "bf16"), (120000, "fp8")):
        ours, baseline = (json.loads(line) for line in _benchmark_output(tok_s).splitlines()[1:])
        rows = tmp_path / f"rows-{precision}.jsonl"
        rows.write_text(json.dumps(dict(ours, precision=precision)) + "\n" + json.dumps(baseline) + "\n")
        assert _tables().main(["--add", str(rows), "--command", f"benchmark --precision {precision}", "--date",
                               "2026-12-08", "--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "| 1B LoRA r16 q,v | H100 | 90,000 |" in text
    assert "| 1B LoRA r16 q,v, FP8 frozen base | H100 | 120,000 |" in text
