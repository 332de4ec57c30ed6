#!/usr/bin/env python
"""Sequence packing speed-up on CPU: LoRA on SmolLM2-135M-Instruct, real skewed-length conversations, packed vs padded.

Data: Chit-Chat Challenge conversations from the PyPI package `chitchat-dataset` (via `scripts/prepare_chitchat.py`'s
reader; first `--max-turns` turns), turned into prompt/completion rows: the prompt is the conversation so far
(``user: …`` / ``assistant: …`` lines), the completion the last assistant turn. Lengths are skewed (SmolLM2 tokens:
median ~120, from under 10 to several hundred), which is where padded batches waste compute.

Both kinds of optimizer step run on one model in one process, alternating (padded, packed, padded, ...), so both see
the same machine load (other work on a shared machine slows both alike); the first step of each kind warms up and is
not timed. Both use the same rows (epoch 0's seeded order), model, LoRA and hyperparameters; packed steps use the bin
batch sizes that ``customize(..., hyperparameters={"sequence_packing_enabled": True})`` derives, so each sees about
as many tokens as a padded step. Reported: real (non-padding) tokens/s, seconds per step, and the wall time of one
epoch of the training rows at that rate (epoch tokens / tokens/s), with the packing factor and padding fractions.

Usage: python scripts/bench_packing.py [--train 300 --steps 5 --batch-size 32 --micro-batch-size 8
--max-seq-length 512 --output-dir /tmp/bench_packing]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _prepare_chitchat():
    """The sibling script ``prepare_chitchat.py`` (its corpus reader), loaded from its file."""
    spec = importlib.util.spec_from_file_location("prepare_chitchat", HERE / "prepare_chitchat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_prompt_completion(row: dict) -> dict:
    """A chat row as a prompt/completion row: everything before the last assistant turn, then that turn."""
    *history, last = row["messages"]
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "
    return {"prompt": prompt, "completion": last["content"]}


def write_dataset(directory: Path, n_train: int, max_turns: int, seed: int) -> None:
    chitchat = _prepare_chitchat()
    rows = chitchat.read_rows(chitchat.find_dataset_json(), max_turns)
    random.Random(seed).shuffle(rows)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "training.jsonl", "w", encoding="utf-8") as f:
        for row in rows[:n_train]:
            f.write(json.dumps(to_prompt_completion(row), ensure_ascii=False) + "\n")


def load_examples(root: Path, max_seq_length: int):
    """(config, checkpoint dir, training examples) with the job's tokenizer and truncation rules."""
    import dataclasses

    from nemo_customizer.checkpoints.resolve import load_tokenizer, resolve_model
    from nemo_customizer.config import compose_config
    from nemo_customizer.data import load_dataset, tokenize_examples

    cfg = compose_config(["model=smollm2-135m-instruct", f"model.max_seq_length={max_seq_length}"])
    resolved = resolve_model(cfg.model, cfg.cache_dir)
    cfg = dataclasses.replace(cfg, model=resolved.config)
    tokenizer = load_tokenizer(resolved.tokenizer_dir, None)
    rows = load_dataset(str(root / "data" / "training.jsonl"), 0.0, 0).train
    examples, _ = tokenize_examples(rows, tokenizer, max_seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return cfg, resolved.checkpoint_dir, examples, pad_id


def step_streams(examples, plan, args, pad_id):
    """Collated micro batches of each optimizer step of epoch 0: padded (``collate``) and packed."""
    from nemo_customizer.data import collate, collate_packed, iterate_micro_batches

    common = dict(dp_rank=0, dp_size=1, seed=args.seed, epoch=0)
    padded = ([collate(m, pad_id=pad_id) for m in micro] for micro in iterate_micro_batches(
        examples, global_batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, **common))
    packed = ([collate_packed(m, pad_id=pad_id) for m in micro] for micro in iterate_micro_batches(
        plan.take(examples), global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
        **common))
    return padded, packed


def bench(args, root: Path) -> dict:
    """Alternate padded and packed optimizer steps on one model, so both see the same machine load."""
    import dataclasses

    import torch

    from nemo_customizer.data import plan_packing
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import train_step

    cfg, checkpoint_dir, examples, pad_id = load_examples(root, args.max_seq_length)
    lengths = sorted(len(e.input_ids) for e in examples)
    print(f"training rows: {len(lengths)}; tokens per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
          f"mean {sum(lengths) / len(lengths):.0f}, max {lengths[-1]}")
    plan = plan_packing(examples, max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                        micro_batch_size=args.micro_batch_size, dp_size=1, seed=args.seed)
    print(plan.describe())
    available = min(len(examples) // args.batch_size, plan.steps_per_epoch)
    if available < args.steps + 1:
        raise SystemExit(f"one epoch of {len(examples)} rows has {available} steps of each kind; --steps "
                         f"{args.steps} needs {args.steps + 1} (one warm-up): raise --train or lower --steps")
    hp = dataclasses.replace(cfg.hyperparameters, learning_rate=1e-4, seed=args.seed, lora=dataclasses.replace(
        cfg.hyperparameters.lora, adapter_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    cfg = dataclasses.replace(cfg, hyperparameters=hp, device="cpu", precision="fp32")
    device = torch.device("cpu")
    with TrainingSession(cfg, checkpoint_dir=checkpoint_dir) as session:
        session.build_model()  # LoRA q/v, seeded with args.seed
        ddp = session.build_training(2 * (args.steps + 1))
        optimizer, scheduler = session.optimizer, session.scheduler
        stats = {name: {"tokens": 0, "seconds": 0.0, "loss_tokens": 0, "steps": 0} for name in ("padded", "packed")}
        streams = dict(zip(("padded", "packed"), step_streams(examples, plan, args, pad_id)))
        for step in range(args.steps + 1):  # step 0 of each warms up and is not timed
            for name, stream in streams.items():
                batches = next(stream)
                started = time.perf_counter()
                out = train_step(ddp, optimizer, scheduler, batches, device)
                elapsed = time.perf_counter() - started
                print(f"step {step} {name}: {out.real_tokens} tokens in {elapsed:.1f} s, loss {out.loss:.3f}",
                      flush=True)
                if step > 0:
                    s = stats[name]
                    s["tokens"] += out.real_tokens
                    s["seconds"] += elapsed
                    s["loss_tokens"] += out.loss_tokens
                    s["steps"] += 1
    return {"plan": plan, "stats": stats, "epoch_tokens": sum(n - 1 for n in lengths)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps of each kind (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/bench_packing"))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    import torch

    root = args.output_dir
    shutil.rmtree(root, ignore_errors=True)
    write_dataset(root / "data", args.train, args.max_turns, args.seed)
    started = time.perf_counter()
    out = bench(args, root)
    plan, stats, total = out["plan"], out["stats"], out["epoch_tokens"]

    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; SmolLM2-135M-Instruct LoRA q/v r=8, fp32, {args.steps} timed steps each, batch "
          f"{args.batch_size} rows (micro {args.micro_batch_size}), max_seq_length {args.max_seq_length}")
    print(f"| run | global batch | micro batch | real tokens/step | loss tokens/step | s/step | real tokens/s | "
          f"epoch wall time ({total:,} tokens) | padding |")
    print("|---|---|---|---|---|---|---|---|---|")
    rates = {}
    for name, s in stats.items():
        rates[name] = s["tokens"] / s["seconds"]
        packed = name == "packed"
        batch = f"{plan.global_batch_size} bins" if packed else f"{args.batch_size} rows"
        micro = f"{plan.micro_batch_size} bin(s)" if packed else f"{args.micro_batch_size} rows"
        padding = f"{100 * (plan.padding_after if packed else plan.padding_before):.1f}%"
        print(f"| {name} | {batch} | {micro} | {s['tokens'] / s['steps']:,.0f} | "
              f"{s['loss_tokens'] / s['steps']:,.0f} | {s['seconds'] / s['steps']:.2f} | {rates[name]:,.1f} | "
              f"{total / rates[name]:,.0f} s | {padding} |")
    print(f"\npacking factor {plan.packing_factor:.2f}; speed-up (tokens/s, packed / padded): "
          f"{rates['packed'] / rates['padded']:.2f}x; benchmark wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
