"""Training throughput of the transformers+peft baseline on a CUDA GPU, for ``scripts/benchmark.py --baseline``.

The baseline trains the same architecture as our model config (random weights, bf16) with ``transformers``' SDPA
attention (eager attention for a model that softcaps attention logits, which SDPA cannot), LoRA through ``peft`` (or every weight for full fine-tuning) and torch's fused AdamW, on ``rows`` dense
causal sequences of ``seq`` tokens per step: the same tokens per step as one of our packed micro batches, with
attention over the whole row (the cheapest layout the baseline has; it cannot restart attention at each example).
Each step is synchronized; the median of the timed steps after the warm-up is reported.

``--kernels liger`` is the same baseline with Liger's Triton kernels patched into the model (what axolotl turns on):
RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy (the logits are never materialized). The patch replaces
functions of ``transformers``' modeling modules for the rest of the process, so ``scripts/benchmark.py`` runs each
baseline in a process of its own.

    python scripts/hf_peft_throughput.py --model llama-3.1-8b-instruct --targets q_proj,v_proj
    python scripts/hf_peft_throughput.py --model llama-3.1-8b-instruct --targets q_proj,v_proj --kernels liger
    python scripts/hf_peft_throughput.py --model llama-3.2-1b-instruct --full
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional, Sequence

import torch


KERNELS = ("torch", "liger")
"""``torch``: transformers' own modules; ``liger``: Liger kernels for RMSNorm, RoPE, SwiGLU and the loss."""


def baseline_model(model_name: str, kernels: str = "torch", *, device: str = "cuda",
                   dtype: torch.dtype = torch.bfloat16):
    """``transformers``' model for our model config ``model_name`` (random weights, bf16, SDPA, on CUDA unless
    ``device``/``dtype`` say otherwise)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_customizer.checkpoints.hf_export import hf_config_dict
    from nemo_customizer.config import config_from_kwargs

    arch = config_from_kwargs(config=model_name).model.architecture
    config_dict = hf_config_dict(arch)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    # SDPA cannot softcap attention logits (Gemma 2): such a model gets transformers' eager attention, which does.
    config._attn_implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    if kernels == "liger":
        _apply_liger(model)
    return model, arch


def _apply_liger(model) -> None:
    """Liger's kernels on this model instance (before PEFT wraps its linears), each of the four that Liger has for
    the model's family; a family Liger does not know is an error, not a silent plain baseline."""
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise SystemExit(f"--kernels liger needs the liger-kernel package ({err})") from err
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True, cross_entropy=False)
    if model.forward.__func__ is type(model).forward:
        raise SystemExit(f"Liger has no fused loss for {type(model).__name__}: no Liger baseline for this family")


def measure(model_name: str, *, targets: Optional[Sequence[str]], seq: int = 4096, rows: int = 1, steps: int = 10,
            warmup: int = 3, rank: int = 16, alpha: int = 32, kernels: str = "torch") -> dict:
    """Tokens/s, median step time and peak memory of the baseline; ``targets=None`` is full fine-tuning. The model
    and optimizer are freed before it returns, so the next measurement in the process starts from an empty GPU."""
    result = _measure(model_name, targets, seq, rows, steps, warmup, rank, alpha, kernels)
    torch.cuda.empty_cache()
    return result


def _measure(model_name, targets, seq, rows, steps, warmup, rank, alpha, kernels) -> dict:
    from peft import LoraConfig, get_peft_model

    model, arch = baseline_model(model_name, kernels)
    if targets is not None:
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=list(targets)))
    return timed_training_steps(model, arch.vocab_size, rows=rows, seq=seq, steps=steps, warmup=warmup)


def timed_training_steps(model, vocab_size: int, *, rows: int, seq: int, steps: int, warmup: int) -> dict:
    """Train ``model`` (a ``transformers`` causal LM on CUDA, its trainable parameters marked) with torch's fused AdamW
    on ``rows`` random ``seq``-token rows per step: tokens/s, the median synchronized step and peak memory, after
    ``warmup`` steps. Every baseline script measures its model with this."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab_size, (rows, seq), device="cuda")

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    return dict(tokens_per_s=rows * seq / step_s, step_ms=step_s * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def baseline_arguments(description: str) -> argparse.ArgumentParser:
    """The options every baseline script takes: the model config, LoRA targets or full fine-tuning, the step's
    shape, steps and warm-up."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b-instruct", help="one of our model configs")
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1, help="dense sequences per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    return parser


def main(argv=None) -> int:
    parser = baseline_arguments(__doc__)
    parser.add_argument("--kernels", choices=KERNELS, default="torch",
                        help="liger: Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy kernels")
    args = parser.parse_args(argv)
    targets = None if args.full else [t for t in args.targets.split(",") if t]
    result = measure(args.model, targets=targets, seq=args.seq, rows=args.rows, steps=args.steps,
                     warmup=args.warmup, kernels=args.kernels)
    print(json.dumps(dict(model=args.model, targets=targets, seq=args.seq, rows=args.rows, kernels=args.kernels,
                          **result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
