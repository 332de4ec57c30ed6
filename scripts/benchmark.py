"""GPU throughput of nemo_customizer training steps, with the HF+PEFT peer in the same process.

    python scripts/benchmark.py --model llama-3.2-1b-instruct --mode lora-qv --seq 4096 --packed
    python scripts/benchmark.py --suite            # the issue's table: 1B/8B LoRA q,v and all-linear, 1B full
    python scripts/benchmark.py --suite --peer     # ... and transformers+peft on the same configs

Random weights (no downloads), bf16. Packed mode fills each 4096-token micro batch with examples whose lengths
follow a realistic distribution (mean ~600 tokens), boundary-respecting attention. Reports real tokens/s per GPU,
model TFLOP/s (4·N per token for LoRA, 6·N for full SFT, + causal attention over the real lengths), MFU against
989 TFLOP/s, peak memory and the card. Warm-up steps excluded; median of timed steps; CUDA-synchronized.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PEAK_TFLOPS = 989.0
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"lora-qv": ("lora", ["q_proj", "v_proj"]), "lora-all": ("lora", ALL_LINEAR), "full": ("all_weights", None)}


def example_lengths(total: int, seed: int, mean: int = 600) -> list[int]:
    """Lengths of examples packed into ``total`` tokens: log-normal around ``mean`` (chat/SFT-like skew)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while used < total:
        n = int(torch.empty(1).log_normal_(mean=6.2, std=0.6, generator=gen).clamp(32, 4096).item())
        n = min(n, total - used)
        lengths.append(n)
        used += n
    return lengths


def model_flops_per_token(arch, kind: str, seq_lengths: list[int]) -> float:
    """4·N (LoRA: frozen base, forward + input grads) or 6·N (full) + causal attention over the real lengths."""
    hidden, layers, vocab = arch.hidden_size, arch.num_hidden_layers, arch.vocab_size
    head_dim = arch.head_dim or hidden // arch.num_attention_heads
    q, kv = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * arch.intermediate_size
    n = layers * per_layer + vocab * hidden  # lm head (the input embedding lookup is not a matmul)
    k = 6 if kind == "all_weights" else 4
    tokens = sum(seq_lengths)
    attention = sum(2 * 2 * layers * L * L / 2 * q for L in seq_lengths) / tokens  # causal fwd per token
    return k * n + attention * (3 if kind == "all_weights" else 2.5)


def run_ours(model_name: str, mode: str, seq: int, packed: bool, steps: int, warmup: int,
             profile_dir: str | None = None, bins_per_micro_batch: int = 1) -> dict:
    from nemo_customizer.config import compose_config
    from nemo_customizer.data.examples import TokenizedExample
    from nemo_customizer.data import collate
    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel
    from nemo_customizer.models.gpt import build_model_for_job
    from nemo_customizer.training.finetuning import prepare_trainable
    from nemo_customizer.training.optim import build_optimizer, build_scheduler
    from nemo_customizer.training.step import train_step
    from nemo_customizer.training.wrap import wrap_for_training

    kind, targets = MODES[mode]
    overrides = [f"model={model_name}", "model.random_weights=true", f"hyperparameters.finetuning_type={kind}",
                 "hyperparameters.lora.adapter_dim=16", "hyperparameters.lora.alpha=32",
                 "hyperparameters.lora.adapter_dropout=0.0", f"model.max_seq_length={seq}"]
    if targets:
        overrides.append(f"hyperparameters.lora.target_modules=[{','.join(targets)}]")
    cfg = compose_config(overrides)
    device = torch.device("cuda")
    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=device, seed=0)
    try:
        model, tconfig = build_model_for_job(cfg.model, None, device=device, params_dtype=torch.bfloat16)
        prepare_trainable(model, cfg)
        ddp = wrap_for_training(model, tconfig)
        optimizer = build_optimizer([ddp], cfg.hyperparameters, torch.bfloat16)
        scheduler = build_scheduler(optimizer, cfg.hyperparameters, steps + warmup)
        vocab = cfg.model.architecture.vocab_size
        gen = torch.Generator().manual_seed(0)

        def examples_of(lengths):
            return [TokenizedExample(torch.randint(0, vocab, (n + 1,), generator=gen).tolist(), [1] * (n + 1))
                    for n in lengths]

        def batch(step: int):
            if not packed:
                return [collate(examples_of([seq]), pad_id=0)], [seq]
            from nemo_customizer.data import collate_packed

            # bins_per_micro_batch bins of `seq` tokens in one forward (one THD row): fewer launches per token
            bins = [example_lengths(seq, seed=step if k == 0 else step * 1000 + k) for k in range(bins_per_micro_batch)]
            return [collate_packed([examples_of(b) for b in bins], pad_id=0)], [n for b in bins for n in b]

        batches = [batch(i) for i in range(steps + warmup)]
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i, (micro, _) in enumerate(batches):
            torch.cuda.synchronize()
            started = time.perf_counter()
            train_step(ddp, optimizer, scheduler, micro, device)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - started)
        step_s = statistics.median(times)
        if profile_dir:
            _profile(lambda micro: train_step(ddp, optimizer, scheduler, micro, device), batches[:3],
                     Path(profile_dir) / f"{model_name}-{mode}")
        lengths = [n for _, ls in batches[warmup:] for n in ls]
        tokens_per_step = sum(lengths) / steps
        tok_s = tokens_per_step / step_s
        tflops = tok_s * model_flops_per_token(cfg.model.architecture, kind, lengths) / 1e12
        return dict(impl="nemo_customizer", model=model_name, mode=mode, seq=seq, packed=packed,
                    bins_per_micro_batch=bins_per_micro_batch if packed else None, tok_s=round(tok_s),
                    tflops=round(tflops), mfu=round(tflops / PEAK_TFLOPS, 3),
                    peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1), step_ms=round(step_s * 1000, 1))
    finally:
        destroy_parallel(layout)
        torch.cuda.empty_cache()


def _profile(step, batches, path: Path) -> None:
    """Kernel time table (top 40 by CUDA time) and a Chrome trace of a few steps, for finding what to speed up."""
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for micro, _ in batches:
            step(micro)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    path.parent.joinpath(path.name + ".txt").write_text(table)  # not with_suffix: "llama-3.2-1b…" has dots
    prof.export_chrome_trace(str(path.parent / (path.name + ".json")))
    print(table, flush=True)


def run_peer(model_name: str, mode: str, seq: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import importlib.util

    peer_path = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peer_hf_peft.py"
    local = Path(__file__).resolve().parent / "_peer_hf_peft.py"
    spec = importlib.util.spec_from_file_location("peer", local if local.exists() else peer_path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    name = {"llama-3.2-1b-instruct": "llama-3.2-1b", "llama-3.1-8b-instruct": "llama-3.1-8b"}[model_name]
    kind, targets = MODES[mode]
    r = peer.run(name, targets, seq=seq, full=kind == "all_weights")
    return dict(impl="hf+peft", model=model_name, mode=mode, seq=seq, packed=False, **{
        k: r[k] for k in ("tok_s", "tflops", "mfu", "peak_gb", "step_ms")})


SUITE = [("llama-3.2-1b-instruct", "lora-qv"), ("llama-3.2-1b-instruct", "lora-all"),
         ("llama-3.2-1b-instruct", "full"), ("llama-3.1-8b-instruct", "lora-qv"), ("llama-3.1-8b-instruct", "lora-all")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b-instruct")
    parser.add_argument("--mode", choices=sorted(MODES), default="lora-qv")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--packed", action="store_true", help="pack variable-length examples (mean ~600 tokens)")
    parser.add_argument("--suite", action="store_true", help="run the issue's table (packed)")
    parser.add_argument("--peer", action="store_true", help="also run transformers+peft on each config")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--bins-per-micro-batch", type=int, default=1,
                        help="packed: this many SEQ-token bins per forward (the step is one micro batch)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile 3 steps of ours: kernel table and Chrome trace per config in DIR")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    configs = SUITE if args.suite else [(args.model, args.mode)]
    rows = []
    for model_name, mode in configs:
        runs = [lambda: run_ours(model_name, mode, args.seq, args.packed or args.suite, args.steps, args.warmup,
                                 args.profile, args.bins_per_micro_batch)]
        if args.peer:
            runs.append(lambda: run_peer(model_name, mode, args.seq))
        for fn in runs:
            try:
                row = fn()
            except torch.cuda.OutOfMemoryError as err:
                row = dict(model=model_name, mode=mode, error=f"OOM: {err}"[:200])
            row["card"] = torch.cuda.get_device_name()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
