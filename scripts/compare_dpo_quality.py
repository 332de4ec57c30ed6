#!/usr/bin/env python
"""Held-out quality of LoRA DPO on real text: ours (`customize()`, `training_type: dpo`) and TRL's `DPOTrainer` with
peft on the same pairs and settings, each against the base model.

    python scripts/compare_dpo_quality.py --output-dir outputs/dpo_quality [--trl-python /path/to/venv/bin/python]

Data: `scripts/prepare_preference_pairs.py` (a King James verse to rewrite in plain English; chosen: the same verse
in the Bible in Basic English; rejected: the King James verse echoed back). SmolLM2-135M-Instruct (the embedded
checkpoint), LoRA q,v (rank 8, alpha 16, no dropout: TRL switches dropout off for DPO, so the policy equals the
reference at step 0), β 0.1, summed response log-probabilities, global batch 16 pairs, AdamW (0.9, 0.98), weight
decay 0.01, cosine decay to a tenth of the learning rate, gradients clipped to 1.0.

On the held-out test pairs, for the base model and each trained adapter, scored by one transformers+peft function
(the responses' summed log-probabilities, tokenized by our preference format):
- `logprob_accuracy`: the share of pairs with log p(chosen) > log p(rejected); for the base model this is its own
  preference, before any training;
- `reward_accuracy` and `reward_margin` (trained runs): DPO's implicit reward β·(log p - log p_base), the share of
  pairs whose chosen reward is higher and the mean difference;
- generation: greedy answers to the test prompts scored with `evaluation.metrics` against the chosen responses
  (BLEU, chrF, ROUGE-L) and against the rejected ones (BLEU, and `echoes`: the share of answers that are the King
  James verse itself). Ours and the base model answer through the job's own evaluation (`evaluation.dataset`: the
  test prompts with the chosen responses as references); TRL's adapter through `transformers` `generate`.
It also checks the reference: the base model's log-probabilities of the first training pairs, computed by
transformers, against the job's stored `reference_log_probs.pt` (and against TRL's precomputed ones).

TRL runs in `--trl-python` (an interpreter where `trl` imports, e.g. a venv made with `--system-site-packages`
and `pip install --no-deps trl`, so it keeps this machine's torch), in its own process beside our job; without it,
or where trl does not import, the TRL row is skipped with the reason. A run's results are kept (`ours.json`,
`trl.json`) and reused by the next call with the same `--output-dir`; delete them to train again. Writes
`<output-dir>/summary.json` and prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_CONFIG = "smollm2-135m-instruct"
TEXT_METRICS = ("bleu", "chrf", "rouge_l")
REFERENCE_CHECK_PAIRS = 32


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/dpo_quality"))
    parser.add_argument("--train", type=int, default=192, help="training pairs")
    parser.add_argument("--validation", type=int, default=16, help="validation pairs")
    parser.add_argument("--test", type=int, default=48, help="held-out test pairs")
    parser.add_argument("--max-words", type=int, default=16, help="longest verse kept (either Bible)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward/backward pass")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64, help="answer tokens per test prompt, at most")
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--trl-python", default=None, help="interpreter with trl installed (default: skip TRL)")
    parser.add_argument("--trl-worker", type=Path, default=None, help=argparse.SUPPRESS)  # TRL's run, in its venv
    args = parser.parse_args(argv)
    if args.trl_worker is not None:
        return _trl_worker(args)

    root = args.output_dir
    data = root / "data"
    subprocess.run([sys.executable, str(HERE / "prepare_preference_pairs.py"), "--output-dir", str(data), "--train",
                    str(args.train), "--validation", str(args.validation), "--test", str(args.test), "--max-words",
                    str(args.max_words), "--seed", str(args.seed)], check=True)
    test_rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    prompts = root / "test_prompts.jsonl"  # the test pairs as prompt/completion rows, for the job's evaluation
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen_response"]}) + "\n"
                               for r in test_rows))

    rows, checks = {}, {}
    trl_run = _start_trl(root, args)  # the two jobs run side by side: their wall times overlap
    ours = _ours(root, data, prompts, args)
    scorer = _Scorer(args)
    test_pairs = scorer.pairs(data / "test.jsonl")
    base = scorer.log_probs(test_pairs, adapter=None)
    rows["base model (no training)"] = {
        **_preference_metrics(base, None, args.beta), **_generation_metrics(ours["base_answers"], test_rows)}
    trained = scorer.log_probs(test_pairs, adapter=root / "ours" / "adapter")
    rows["ours (customize, training_type=dpo)"] = {
        "steps": ours["steps"], "seconds": ours["seconds"], "final_train": ours["final_train"],
        "val": ours["val"], **_preference_metrics(trained, base, args.beta),
        **_generation_metrics(ours["answers"], test_rows)}
    train_pairs = scorer.pairs(data / "training.jsonl")[:REFERENCE_CHECK_PAIRS]
    transformers_reference = scorer.log_probs(train_pairs, adapter=None)
    import torch
    stored = torch.load(root / "ours" / "reference_log_probs.pt", weights_only=True)["train"]
    checks["ours_reference_vs_transformers_max_abs"] = float(
        (stored[:REFERENCE_CHECK_PAIRS] - torch.tensor(transformers_reference)).abs().max())

    trl = _finish_trl(trl_run, root)
    if "skipped" in trl:
        rows["TRL DPOTrainer + peft"] = {"skipped": trl["skipped"]}
    else:
        tuned = scorer.log_probs(test_pairs, adapter=Path(trl["adapter"]))
        rows["TRL DPOTrainer + peft"] = {
            "steps": trl["steps"], "seconds": trl["seconds"], "final_train": trl["final_train"],
            **_preference_metrics(tuned, base, args.beta), **_generation_metrics(trl["answers"], test_rows)}
        theirs = torch.tensor(trl["reference"])[:REFERENCE_CHECK_PAIRS]
        checks["trl_reference_vs_ours_max_abs"] = float((stored[:REFERENCE_CHECK_PAIRS] - theirs).abs().max())

    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("output_dir", "trl_worker")},
               "runs": rows, "checks": checks}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_table(rows, checks)
    return 0


# --- ours ------------------------------------------------------------------------------------------------------------

def _hyperparameters(args) -> dict:
    return {"training_type": "dpo", "epochs": args.epochs, "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size, "learning_rate": args.learning_rate,
            "min_learning_rate": args.learning_rate / 10, "seed": args.seed,
            "lora": {"adapter_dim": 8, "alpha": 16, "adapter_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "dpo": {"ref_policy_kl_penalty": args.beta}}


def _ours(root: Path, data: Path, prompts: Path, args) -> dict:
    """Our job (with the base model's and its own answers), or its results from an earlier call (``ours.json``)."""
    from nemo_customizer import customize

    saved = root / "ours.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    job = root / "ours"
    started = time.monotonic()
    result = customize(MODEL_CONFIG, dataset=str(data), output_dir=str(job), device="cpu",
                       hyperparameters=_hyperparameters(args), model={"max_seq_length": args.max_seq_length},
                       evaluation={"enabled": True, "dataset": str(prompts), "max_tokens": args.max_tokens,
                                   "metrics": list(TEXT_METRICS), "compare_base": True},
                       progress_bar=False)
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("event") == "train"]
    val = [r for r in records if r.get("event") == "validation"]
    predictions = json.loads((job / "evaluation.json").read_text())["predictions"]
    out = {"steps": result.steps, "seconds": round(time.monotonic() - started),
           "final_train": _rounded(train[-1]) if train else None, "val": _rounded(val[-1]) if val else None,
           "answers": [p["customized"] for p in predictions], "base_answers": [p["base"] for p in predictions]}
    saved.write_text(json.dumps(out) + "\n")
    return out


def _rounded(record: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}


# --- scoring -------------------------------------------------------------------------------------------------------

class _Scorer:
    """Summed response log-probabilities of preference pairs under the base model, with or without a PEFT adapter,
    computed by transformers on the pairs as our preference format tokenizes them."""

    def __init__(self, args):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint

        self.checkpoint = resolve_embedded_checkpoint(MODEL_CONFIG)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.checkpoint), local_files_only=True)
        self.model_class = AutoModelForCausalLM
        self.max_seq_length = args.max_seq_length

    def pairs(self, path: Path) -> list:
        from nemo_customizer.data import load_dataset, tokenize_examples

        examples = load_dataset(path, val_fraction=0.0).train
        pairs, _ = tokenize_examples(examples, self.tokenizer, self.max_seq_length)
        return pairs

    def log_probs(self, pairs: list, adapter: Path | None, batch_size: int = 16) -> list[tuple[float, float]]:
        import torch

        model = self.model_class.from_pretrained(str(self.checkpoint), dtype=torch.float32, local_files_only=True)
        if adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        sequences = [s for pair in pairs for s in (pair.chosen, pair.rejected)]
        sums = []
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start:start + batch_size]
                width = max(len(s.input_ids) for s in chunk)
                ids = torch.tensor([s.input_ids + [0] * (width - len(s.input_ids)) for s in chunk])
                mask = torch.tensor([s.loss_mask + [0] * (width - len(s.loss_mask)) for s in chunk])
                attention = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in chunk])
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
                token = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                sums += (token * mask[:, 1:]).sum(dim=1).tolist()  # token i is predicted at position i - 1
        return [(sums[i], sums[i + 1]) for i in range(0, len(sums), 2)]


def _preference_metrics(policy: list, reference: list | None, beta: float) -> dict:
    n = len(policy)
    out = {"logprob_accuracy": sum(c > r for c, r in policy) / n,
           "mean_logp_chosen": sum(c for c, _ in policy) / n, "mean_logp_rejected": sum(r for _, r in policy) / n}
    if reference is not None:
        margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, reference)]
        out.update(reward_accuracy=sum(m > 0 for m in margins) / n, reward_margin=sum(margins) / n)
    return {k: round(v, 4) for k, v in out.items()}


def _generation_metrics(answers: list[str], rows: list[dict]) -> dict:
    from nemo_customizer.evaluation.metrics import compute_generation_metrics

    chosen = compute_generation_metrics(TEXT_METRICS, answers, [r["chosen_response"] for r in rows])
    rejected = [r["rejected_response"] for r in rows]
    against_rejected = compute_generation_metrics(("bleu", "exact_match"), answers, rejected)
    return {**{f"{k}_vs_chosen": round(v, 2) for k, v in chosen.items()},
            "bleu_vs_rejected": round(against_rejected["bleu"], 2),
            "echoes": round(against_rejected["exact_match"], 4), "answers": answers}


# --- TRL -------------------------------------------------------------------------------------------------------------

def _start_trl(root: Path, args):
    """TRL's run in ``--trl-python`` (its own interpreter), started beside ours: ``(process, None)``, or ``(None,
    result)`` where it ran in an earlier call (``trl.json``) or is skipped (the reason)."""
    out = root / "trl.json"
    if out.is_file():
        return None, json.loads(out.read_text())
    if not args.trl_python:
        return None, {"skipped": "no --trl-python given"}
    probe = subprocess.run([args.trl_python, "-c", "import trl, peft; print(trl.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None, {"skipped": f"trl does not import in {args.trl_python}: {probe.stderr.strip().splitlines()[-1:]}"}
    command = [args.trl_python, str(Path(__file__).resolve()), "--output-dir", str(root), "--trl-worker", str(out)]
    for name in ("beta", "learning_rate", "epochs", "batch_size", "micro_batch_size", "max_seq_length", "max_tokens",
                 "seed"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return subprocess.Popen(command), None


def _finish_trl(started, root: Path) -> dict:
    process, result = started
    if process is None:
        return result
    if process.wait() != 0:
        return {"skipped": f"TRL's run failed (exit status {process.returncode}); its output is above"}
    return json.loads((root / "trl.json").read_text())


def _trl_worker(args) -> int:
    """Train with TRL's ``DPOTrainer`` on ``<output-dir>/data`` as ours trains, then answer the test prompts."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, __version__

    from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint

    sys.path.insert(0, str(HERE))
    from hf_peft_baseline import generate

    started = time.monotonic()  # as ours: the reference pass, training and the answers
    root = args.output_dir
    checkpoint = str(resolve_embedded_checkpoint(MODEL_CONFIG))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)

    def rows(name: str) -> Dataset:  # NeMo Customizer's field names as TRL's
        lines = (root / "data" / f"{name}.jsonl").read_text().splitlines()
        return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen_response"],
                                   "rejected": r["rejected_response"]} for r in map(json.loads, lines)])

    hyper = _hyperparameters(args)
    config = DPOConfig(
        output_dir=str(root / "trl"), beta=args.beta, loss_type=["sigmoid"], learning_rate=args.learning_rate,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": hyper["min_learning_rate"]},
        warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-8, max_grad_norm=1.0,
        num_train_epochs=args.epochs, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size, max_length=args.max_seq_length,
        precompute_ref_log_probs=True, seed=args.seed, data_seed=args.seed, use_cpu=True, bf16=False,
        save_strategy="no", eval_strategy="no", logging_steps=5, report_to="none", disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=rows("training"), processing_class=tokenizer,
                         peft_config=lora)
    reference = list(zip(trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]))
    trainer.train()
    adapter = root / "trl" / "adapter"
    trainer.model.save_pretrained(str(adapter))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    test = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()]
    answers = generate(trainer.model, tokenizer, [r["prompt"] for r in test], args.max_tokens, 16, "cpu")
    args.trl_worker.write_text(json.dumps({
        "trl": __version__, "steps": trainer.state.global_step, "seconds": round(time.monotonic() - started),
        "final_train": _rounded(logged[-1]) if logged else None, "adapter": str(adapter), "answers": answers,
        "reference": [[float(c), float(r)] for c, r in reference]}) + "\n")
    return 0


# --- report ----------------------------------------------------------------------------------------------------------

def _print_table(rows: dict, checks: dict) -> None:
    columns = ("steps", "seconds", "logprob_accuracy", "reward_accuracy", "reward_margin", "mean_logp_chosen",
               "mean_logp_rejected", "bleu_vs_chosen", "chrf_vs_chosen", "rouge_l_vs_chosen", "bleu_vs_rejected",
               "echoes")
    print("\n| run | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row.get(c, "-")) for c in columns) + " |")
    for name, value in checks.items():
        print(f"{name}: {value:.3g}")


if __name__ == "__main__":
    sys.exit(main())
