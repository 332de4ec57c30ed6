#!/usr/bin/env python
"""LoRA with plain `transformers` + `peft` on prompt/completion JSONL, trained as nemo_customizer trains, then greedy
generations for the test rows: the baseline that our adapters' quality is compared with, on the same rows.

The same as `python -m nemo_customizer` (LoRA, one process, no packing), through our own data functions:
- rows and loss masks: `load_dataset` + `tokenize_examples` (prompt with the tokenizer's special tokens, completion
  without, then EOS; loss on the completion and EOS; over-long prompts lose tokens from the left);
- batches: global batch k of epoch e is examples [k*B, (k+1)*B) of `epoch_order(n, seed, e)`, the last incomplete
  one dropped, cut into micro batches and collated by `collate` (right padding, no attention mask);
- loss: the summed token losses of a global batch divided by its loss-token count;
- AdamW (betas 0.9/0.98, eps 1e-8, decoupled weight decay on matrices, none on biases and norms), gradients clipped
  to norm 1.0, learning rate warmed up linearly then cosine-decayed to the minimum over the planned steps (Megatron's
  OptimizerParamScheduler as `training.optim.build_scheduler` sets it up: update k uses the rate after k updates);
- validation after every epoch; generation uses the adapter of the best validation loss (`EarlyStopping`: an
  improvement of more than 0.001), and training stops after 10 validations without one.
Not the same: the random draws (LoRA A initialisation, dropout masks: peft draws one per projection, ours one per
fused QKV input), and under bf16 peft keeps and applies the adapter in fp32.

Usage: python scripts/hf_peft_baseline.py --data data/simplification --epochs 3 --output outputs/hf_peft.json
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nemo_customizer.data import collate, iterate_micro_batches, load_dataset, steps_per_epoch, tokenize_examples
from nemo_customizer.training.early_stopping import EarlyStopping

MODEL_CONFIG = "smollm2-135m-instruct"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help=f"HF checkpoint folder (default: the converted embedded {MODEL_CONFIG})")
    parser.add_argument("--data", type=pathlib.Path, required=True, help="training/validation/test .jsonl folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="examples per forward/backward pass")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--min-learning-rate", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help=f"default: model config {MODEL_CONFIG}'s max_seq_length")
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per test prompt, at most")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="results .json")
    args = parser.parse_args(argv)
    if args.model is None:
        from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint
        args.model = resolve_embedded_checkpoint(MODEL_CONFIG)
    if args.max_seq_length is None:
        from nemo_customizer.config import compose_config
        args.max_seq_length = compose_config([f"model={MODEL_CONFIG}"]).model.max_seq_length
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def load_model(args: argparse.Namespace):
    """Tokenizer and the base model with LoRA on ``args.target_modules`` (the only trainable weights)."""
    tokenizer = AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype, local_files_only=True)
    model.config.use_cache = False
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.target_modules), bias="none", task_type="CAUSAL_LM")
    return tokenizer, get_peft_model(model, lora).to(args.device)


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """Megatron's parameter groups: no weight decay on biases and other 1-D parameters."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decayed = [p for name, p in trainable if p.ndim > 1 and not name.endswith(".bias")]
    others = [p for name, p in trainable if p.ndim <= 1 or name.endswith(".bias")]
    groups = [{"params": decayed, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-8)


def learning_rate(updates_done: int, total_steps: int, args: argparse.Namespace) -> float:
    """The rate for the update after ``updates_done`` updates: linear warmup from 0, then cosine decay."""
    warmup = min(args.warmup_steps, max(total_steps - 1, 0))
    if warmup and updates_done <= warmup:
        return args.learning_rate * updates_done / warmup
    decay_steps = max(total_steps, warmup + 1)
    if updates_done > decay_steps:
        return args.min_learning_rate
    progress = (updates_done - warmup) / (decay_steps - warmup)
    cosine = 0.5 * (math.cos(math.pi * progress) + 1.0)
    return args.min_learning_rate + (args.learning_rate - args.min_learning_rate) * cosine


def summed_loss(model: torch.nn.Module, batch: dict, device: str) -> torch.Tensor:
    """Sum of the cross entropies at the loss-masked positions of one collated micro batch."""
    logits = model(input_ids=batch["tokens"].to(device), position_ids=batch["position_ids"].to(device)).logits
    mask = batch["loss_mask"].bool()  # (b, s)
    picked = logits[mask.to(device)].float()  # (loss tokens, vocab)
    return F.cross_entropy(picked, batch["labels"][mask].to(device), reduction="sum")


def train_step(model, optimizer, micro_batches: list, lr: float, device: str) -> float:
    """One optimizer step over a global batch; returns its token-mean loss."""
    model.train()
    loss_tokens = max(sum(int(b["loss_mask"].sum()) for b in micro_batches), 1)
    total = 0.0
    for batch in micro_batches:
        loss = summed_loss(model, batch, device)
        (loss / loss_tokens).backward()  # the global token mean's gradient, accumulated over micro batches
        total += loss.item()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / loss_tokens


@torch.no_grad()
def validation_loss(model, examples: list, micro_batch_size: int, pad_id: int, device: str) -> float:
    """Token-mean loss over every validation example."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        batch = collate(examples[start:start + micro_batch_size], pad_id=pad_id)
        total += summed_loss(model, batch, device).item()
        tokens += int(batch["loss_mask"].sum())
    return total / tokens if tokens else float("nan")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_tokens: int, batch_size: int, device: str) -> list[str]:
    """Greedy completions, batched with left padding, each cut at its first EOS and stripped."""
    model.eval()
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    texts = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start:start + batch_size], add_special_tokens=True, padding=True,
                           return_tensors="pt").to(device)
        output = model.generate(**inputs, generation_config=config)  # (b, prompt + new)
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            row = row[:row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Label accuracy when the references are a small label set, else BLEU, chrF and ROUGE-L (and exact match)."""
    from nemo_customizer.evaluation import metrics  # needs sacrebleu and rouge_score only for the text metrics

    labels = metrics.label_set(references)
    names = ("exact_match", "accuracy") if labels else ("exact_match", "bleu", "chrf", "rouge_l")
    return metrics.compute_generation_metrics(names, predictions, references, labels=labels)


def fit(model, optimizer, train: list, val: list, pad_id: int, args: argparse.Namespace) -> dict:
    """Every epoch's steps and a validation after it; leaves the best adapter (by validation loss) in ``model``."""
    total_steps = args.epochs * steps_per_epoch(len(train), args.batch_size)
    stopper, best, step, losses, val_losses, real_tokens = EarlyStopping(), None, 0, [], [], []
    for epoch in range(args.epochs):
        for micro in iterate_micro_batches(train, global_batch_size=args.batch_size,
                                           micro_batch_size=args.micro_batch_size, dp_rank=0, dp_size=1,
                                           seed=args.seed, epoch=epoch):
            batches = [collate(m, pad_id=pad_id) for m in micro]
            real_tokens.append(sum(int(b["num_real_tokens"]) for b in batches))
            losses.append(train_step(model, optimizer, batches, learning_rate(step, total_steps, args), args.device))
            step += 1
        val_losses.append(validation_loss(model, val, args.micro_batch_size, pad_id, args.device))
        print(f"epoch {epoch}: {step} steps, train loss {losses[-1]:.4f}, validation loss {val_losses[-1]:.4f}")
        if stopper.update(val_losses[-1], step):
            best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if stopper.should_stop:
            break
    if best is not None:
        model.load_state_dict(best, strict=False)
    return {"steps": step, "train_losses": losses, "val_losses": val_losses, "best_val_loss": stopper.best,
            "tokens_per_step": sum(real_tokens) / max(len(real_tokens), 1)}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer, model = load_model(args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    splits = load_dataset(args.data, seed=args.seed)
    train, _ = tokenize_examples(splits.train, tokenizer, args.max_seq_length)
    val, _ = tokenize_examples(splits.val, tokenizer, args.max_seq_length)
    with (args.data / "test.jsonl").open(encoding="utf-8") as f:
        test = [json.loads(line) for line in f if line.strip()]
    print(f"{len(train)} training, {len(val)} validation, {len(test)} test rows; {args.model} on {args.device} "
          f"({args.dtype})")

    start = time.perf_counter()
    result = fit(model, build_optimizer(model, args), train, val, pad_id, args)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predictions = generate(model, tokenizer, [row["prompt"] for row in test], args.max_tokens, args.batch_size,
                           args.device)
    references = [row["completion"] for row in test]
    scores = generation_metrics(predictions, references)
    print(f"trained {result['steps']} steps in {train_seconds:.1f} s, best validation loss "
          f"{result['best_val_loss']:.4f}; {len(predictions)} generations in {time.perf_counter() - start:.1f} s")
    print("test metrics: " + ", ".join(f"{name} {value:.4g}" for name, value in scores.items()))
    settings = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}
    out = {"settings": settings, "steps": result["steps"], "tokens_per_step": result["tokens_per_step"],
           "val_loss": result["best_val_loss"], "val_losses": result["val_losses"],
           "train_losses": result["train_losses"], "train_seconds": train_seconds,
           "metrics": scores, "predictions": predictions, "references": references}
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
