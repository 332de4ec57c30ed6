"""FP8 against bf16 on the same random weights (CUDA, compute capability 9.0+): how far ``precision=fp8`` moves a
LoRA job's numbers. Prints JSON lines:

    {"measure": "logits", ...}         max|fp8 - bf16| / max|bf16| and the RMS relative error of the logits
    {"measure": "lora_grads", ...}     one step's LoRA gradient relative error per group (A / B of each projection):
                                       the max and the median over layers
    {"measure": "loss_curve", ...}     the per-step training losses of N steps, fp8 beside bf16 (``reference``)

    python scripts/fp8_numerics.py                                   # 8B-shaped, LoRA q,v, 20 steps
    python scripts/fp8_numerics.py --model llama-3.2-1b-instruct --layers 4 --targets q_proj,v_proj,o_proj
    python scripts/fp8_numerics.py --device cpu --model llama-3.2-1b-instruct --layers 2 --seq 256 --steps 10

Random weights, and B drawn small instead of zero so that A's gradient is not zero at step 0. The training run
repeats a few fixed random sequences so the loss falls. ``tests/gpu/test_fp8_gpu.py`` runs the same measures on a
small model and bounds them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Dict, List, Optional

import torch


def _config(model: str, precision: str, targets: List[str], seq: int, layers: Optional[int],
            architecture: Optional[Dict[str, object]] = None, device: str = "cuda"):
    from nemo_customizer.config import compose_config

    overrides = [f"model={model}", "model.random_weights=true", "hyperparameters.finetuning_type=lora",
                 f"hyperparameters.lora.target_modules=[{','.join(targets)}]", "hyperparameters.lora.adapter_dim=16",
                 "hyperparameters.lora.alpha=32", "hyperparameters.lora.adapter_dropout=0.0",
                 "hyperparameters.learning_rate=1e-3", "hyperparameters.warmup_steps=0", f"model.max_seq_length={seq}",
                 f"precision={precision}", f"device={device}", "hyperparameters.seed=0"]
    if layers is not None:
        overrides.append(f"model.architecture.num_hidden_layers={layers}")
    overrides += [f"model.architecture.{key}={value}" for key, value in (architecture or {}).items()]
    return compose_config(overrides)


def _draw_lora_b(model: torch.nn.Module, seed: int) -> None:
    """Every B small and random (the same in every model of this architecture), so A gets a gradient at once."""
    from nemo_customizer.peft.lora import adapter_parameters

    generator = torch.Generator().manual_seed(seed)
    for name, param in adapter_parameters(model).items():
        if name.endswith("lora_B"):
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _group(name: str) -> str:
    """``decoder.layers.3.self_attention.linear_qkv.adapters.q_proj.lora_A`` → ``q_proj.lora_A``."""
    parts = name.split(".")
    return f"{parts[-2]}.{parts[-1]}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def run_precision(model: str, precision: str, *, targets: List[str], seq: int, steps: int, layers: Optional[int],
                  architecture: Optional[Dict[str, object]] = None, batches: int = 4, device: str = "cuda") -> dict:
    """One precision's logits and LoRA gradients on a fixed batch, then ``steps`` training steps' losses."""
    from nemo_customizer.data import collate
    from nemo_customizer.data.examples import TokenizedExample
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.peft.lora import adapter_parameters
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import train_step

    cfg = _config(model, precision, targets, seq, layers, architecture, device)
    vocab = cfg.model.architecture.vocab_size
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, vocab, (seq + 1,), generator=generator).tolist() for _ in range(batches)]
    device = torch.device(device)
    with TrainingSession(cfg, checkpoint_dir=None) as session:
        net = session.build_model()
        _draw_lora_b(net, seed=2)
        tokens = torch.tensor(sequences[0][:seq], device=device)[None]
        logits = forward_logits(net, tokens)  # (1, seq, vocab)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
        loss.backward()
        grads = {name: p.grad.float().cpu() for name, p in adapter_parameters(net).items()}
        for p in net.parameters():
            p.grad = None
        session.build_training(steps)
        losses = []
        for step in range(steps):
            ids = sequences[step % batches]
            micro = collate([TokenizedExample(ids, [1] * len(ids))], pad_id=0)
            losses.append(train_step(session.wrapped, session.optimizer, session.scheduler, [micro], device).loss)
        return dict(logits=logits.float().cpu(), grads=grads, first_loss=loss.item(), losses=losses)


def compare(model: str, *, targets: List[str], seq: int, steps: int, layers: Optional[int] = None,
            architecture: Optional[Dict[str, object]] = None, device: str = "cuda") -> List[dict]:
    """The JSON rows: fp8 against bf16 (``reference``) on the same random weights; on the CPU, the simulated FP8
    arithmetic against fp32 (mcore trains fp32 weights there)."""
    reference_precision = "bf16" if device == "cuda" else "fp32"
    kwargs = dict(targets=targets, seq=seq, steps=steps, layers=layers, architecture=architecture, device=device)
    reference = run_precision(model, reference_precision, **kwargs)
    if device == "cuda":
        torch.cuda.empty_cache()
    fp8 = run_precision(model, "fp8", **kwargs)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (FP8 simulated)"
    common = dict(model=model, layers=layers, targets=targets, seq=seq, against=reference_precision, card=card)
    diff = fp8["logits"] - reference["logits"]
    rows = [dict(measure="logits", **common, max_rel=_rel(fp8["logits"], reference["logits"]),
                 rms_rel=(diff.pow(2).mean().sqrt() / reference["logits"].pow(2).mean().sqrt()).item(),
                 loss_reference=reference["first_loss"], loss_fp8=fp8["first_loss"])]
    groups: Dict[str, List[float]] = {}
    for name, grad in reference["grads"].items():
        groups.setdefault(_group(name), []).append(_rel(fp8["grads"][name], grad))
    rows.append(dict(measure="lora_grads", **common, groups={
        group: dict(max=max(errors), median=statistics.median(errors)) for group, errors in sorted(groups.items())}))
    rows.append(dict(measure="loss_curve", **common, steps=steps,
                     reference=[round(x, 5) for x in reference["losses"]],
                     fp8=[round(x, 5) for x in fp8["losses"]],
                     max_step_rel=max(abs(a - b) / abs(a) for a, b in zip(reference["losses"], fp8["losses"]))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b-instruct", help="a conf/model name (its architecture)")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the model's")
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the simulated FP8 arithmetic (e4m3 rounding, fp32 products) against fp32")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: FP8 numerics on the GPU need a CUDA GPU (--device cpu simulates the arithmetic)", flush=True)
        return 2
    for row in compare(args.model, targets=args.targets.split(","), seq=args.seq, steps=args.steps,
                       layers=args.layers, device=args.device):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
