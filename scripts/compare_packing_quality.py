#!/usr/bin/env python
"""Held-out task quality of LoRA on real text: ours unpacked, ours packed, and the transformers+peft baseline on the
same rows and settings, each before (the base model) and after training.

    python scripts/compare_packing_quality.py --task simplification --output-dir outputs/quality
    python scripts/compare_packing_quality.py --task classification --output-dir outputs/quality

Tasks (data from packages, NeMo Customizer's prompt/completion format): ``classification`` (rotten-tomatoes reviews
fresh/rotten, ``scripts/prepare_rotten_tomatoes.py``) and ``simplification`` (King James verses rewritten in Basic
English, ``scripts/prepare_simplification.py``). SmolLM2-135M-Instruct, LoRA q,v (r 8, alpha 16), one epoch, global
batch 16, greedy answers. Prints one markdown table: optimizer steps, tokens per step, validation loss and the task
metrics, for each run; writes every result to ``<output-dir>/<task>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = {
    # task: (prepare script, its size arguments, learning rate, max answer tokens, metrics reported)
    "classification": ("prepare_rotten_tomatoes.py", ["--train", "720", "--validation", "60", "--test", "200"],
                       1e-3, 4, ("accuracy", "label_logprob_accuracy", "loss")),
    "simplification": ("prepare_simplification.py", ["--train", "720", "--validation", "60", "--test", "60"],
                       3e-4, 64, ("bleu", "chrf", "rouge_l", "loss")),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/quality"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="data split seed")
    parser.add_argument("--training-seeds", type=int, nargs="+", default=[0],
                        help="training seeds (LoRA init, dropout, data order) of our runs; several give the spread "
                             "between runs that differ only by chance; transformers+peft runs with the first")
    parser.add_argument("--skip-baseline", action="store_true", help="only our runs")
    args = parser.parse_args(argv)
    script, sizes, lr, max_tokens, shown = TASKS[args.task]
    root = args.output_dir / args.task
    data = root / "data"
    subprocess.run([sys.executable, str(HERE / script), "--output-dir", str(data), *sizes, "--seed",
                    str(args.seed)], check=True)
    hyperparameters = {"epochs": 1, "batch_size": 16, "micro_batch_size": args.micro_batch_size,
                       "learning_rate": lr, "min_learning_rate": lr / 10,
                       "lora": {"adapter_dim": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}
    summary = root / "summary.json"
    previous = json.loads(summary.read_text()) if summary.is_file() else {}  # runs of earlier invocations
    rows = {}
    for seed in args.training_seeds:
        for packed in (False, True):
            name = f"ours, {'packed' if packed else 'unpacked'}, seed {seed}"
            need_base = "base model (no training)" not in {**previous, **rows}  # the base is evaluated once
            rows[name] = _ours(root, data, {**hyperparameters, "seed": seed}, packed, max_tokens, args.device,
                               compare_base=need_base, job_name=f"{name.split(', ')[1]}-{seed}")
            if "base" in rows[name]:
                rows["base model (no training)"] = rows[name].pop("base")
    if not args.skip_baseline:
        rows["transformers+peft"] = _baseline(root, data, {**hyperparameters, "seed": args.training_seeds[0]},
                                              max_tokens, args.device, args.task)
    rows = {**previous, **rows}
    summary.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n| {args.task} run | optimizer steps | tokens per step | val loss | "
          + " | ".join(f"held-out {m}" for m in shown) + " |")
    print("|---" * (4 + len(shown)) + "|")
    for name, row in rows.items():
        print(f"| {name} | {row.get('steps', '-')} | {_fmt(row.get('tokens_per_step'), '{:,.0f}')} | "
              f"{_fmt(row.get('val_loss'), '{:.3f}')} | "
              + " | ".join(_fmt(row['metrics'].get(m), '{:.3f}' if m == 'loss' else '{:.4g}') for m in shown) + " |")
    _paired_bootstrap(rows, data, shown[0], args.task)
    for kind in ("unpacked", "packed"):  # mean and range over training seeds
        runs = [row for name, row in rows.items() if name.startswith(f"ours, {kind}, seed")]
        if len(runs) > 1:
            cells = []
            for m in shown:
                values = [run["metrics"][m] for run in runs]
                cells.append(f"{sum(values) / len(values):.4g} ({min(values):.4g}-{max(values):.4g})")
            print(f"| ours, {kind}: mean (range) of {len(runs)} seeds | | | | " + " | ".join(cells) + " |")
    return 0


def _ours(root: Path, data: Path, hyperparameters: dict, packed: bool, max_tokens: int, device: str,
          compare_base: bool, job_name: str) -> dict:
    from nemo_customizer import customize

    job = root / job_name
    result = customize("smollm2-135m-instruct", dataset=str(data), output_dir=str(job), device=device,
                       hyperparameters={**hyperparameters, "sequence_packing_enabled": packed},
                       evaluation={"enabled": True, "max_tokens": max_tokens, "compare_base": compare_base},
                       progress_bar=False)
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    answers = [r["customized"] for r in json.loads((job / "evaluation.json").read_text())["predictions"]]
    row = {"steps": result.steps, "val_loss": result.best_val_loss, "metrics": result.evaluation["customized"],
           "answers": answers,
           "tokens_per_step": sum(r["tokens"] for r in train) / len(train) if train and "tokens" in train[0]
           else None}
    if compare_base:
        row["base"] = {"metrics": result.evaluation["base"]}
    return row


def _baseline(root: Path, data: Path, hyperparameters: dict, max_tokens: int, device: str, task: str) -> dict:
    """transformers+peft on the same rows (scripts/hf_peft_baseline.py), its answers scored with our metrics."""
    from nemo_customizer.evaluation.heldout import read_heldout
    from nemo_customizer.evaluation.metrics import compute_generation_metrics

    out = root / "transformers_peft.json"
    subprocess.run([sys.executable, str(HERE / "hf_peft_baseline.py"), "--data", str(data), "--epochs", "1",
                    "--batch-size", "16", "--micro-batch-size", str(hyperparameters["micro_batch_size"]),
                    "--learning-rate", str(hyperparameters["learning_rate"]),
                    "--min-learning-rate", str(hyperparameters["min_learning_rate"]), "--lora-r", "8",
                    "--lora-alpha", "16", "--max-tokens", str(max_tokens), "--seed", str(hyperparameters["seed"]),
                    "--device", device, "--output", str(out)], check=True)
    run = json.loads(out.read_text())
    heldout = read_heldout(data / "test.jsonl")
    names = ["accuracy"] if task == "classification" else ["bleu", "chrf", "rouge_l"]
    metrics = compute_generation_metrics(names, run["predictions"], heldout.references, labels=heldout.labels)
    return {"steps": run["steps"], "tokens_per_step": run.get("tokens_per_step"), "val_loss": run.get("val_loss"),
            "metrics": metrics, "answers": run["predictions"]}


def _paired_bootstrap(rows: dict, data: Path, metric: str, task: str, resamples: int = 1000) -> None:
    """How far each run's ``metric`` is from the first unpacked run's by chance of the test rows: the mean and 95%
    interval of the difference over ``resamples`` resamplings of the rows (the same rows for both runs)."""
    import random

    from nemo_customizer.evaluation.heldout import read_heldout
    from nemo_customizer.evaluation.metrics import compute_generation_metrics

    heldout = read_heldout(data / "test.jsonl")
    runs = {name: row["answers"] for name, row in rows.items() if row.get("answers")}
    reference = next((name for name in runs if name.startswith("ours, unpacked")), None)
    if reference is None:
        return
    rng = random.Random(0)

    def score(answers, index):
        return compute_generation_metrics([metric], [answers[i] for i in index],
                                          [heldout.references[i] for i in index], labels=heldout.labels)[metric]

    samples = [[rng.randrange(len(heldout.references)) for _ in heldout.references] for _ in range(resamples)]
    for name, answers in runs.items():
        if name == reference:
            continue
        differences = sorted(score(answers, index) - score(runs[reference], index) for index in samples)
        print(f"{task}: {metric} of '{name}' minus '{reference}': {sum(differences) / resamples:+.4g} (95% of "
              f"resamplings of the test rows: {differences[int(0.025 * resamples)]:+.4g} to "
              f"{differences[int(0.975 * resamples) - 1]:+.4g})")


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


if __name__ == "__main__":
    sys.exit(main())
