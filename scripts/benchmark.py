"""GPU throughput of nemo_customizer training steps, with the transformers+peft baseline in the same process.

    python scripts/benchmark.py --model llama-3.2-1b-instruct --mode lora-qv --seq 4096 --packed
    python scripts/benchmark.py --suite            # the standard table: 1B/8B LoRA q,v and all-linear, 1B full
    python scripts/benchmark.py --suite --baseline # ... and transformers+peft on the same configs
    python scripts/benchmark.py --suite --baseline --model llama-3.1-8b-instruct   # the suite's rows of one model
    python scripts/benchmark.py --suite --equal-work --baseline hf-peft,liger   # equal work, two baselines
    python scripts/benchmark.py --suite --equal-work --baseline hf-peft,liger,unsloth   # ... and Unsloth
    torchrun --nproc-per-node 2 scripts/benchmark.py --model llama-3.1-8b-instruct --mode lora-qv --packed \
        --tp 2 --sp                                # tensor (+ sequence) parallel: tokens/s per GPU

Random weights (no downloads), bf16. Packed mode fills each 4096-token micro batch with examples whose lengths
follow a realistic distribution (mean ~600 tokens), boundary-respecting attention. ``--equal-work`` gives each
micro batch exactly the baselines' work instead: one causal sequence of ``--seq`` tokens (per bin), through the same
packed path (THD, CUDA graphs), so a ratio to a baseline compares the same FLOPs. Reports real tokens/s per GPU,
model TFLOP/s (4·N per token for LoRA, 6·N for full SFT, + causal attention over the real lengths), MFU against
989 TFLOP/s, peak memory and the card. Warm-up steps excluded; median of timed steps. A step's time is the
interval between reading its numbers and the previous step's (each read waits for the GPU), with each step queued
before the previous one is read: the training loop's own stepping (``training.pipelined.PipelinedSteps``;
``--synced-steps``: synchronize before and after each step instead).
After timing, one more step runs under CUDA's sync debug mode and the row reports how many times it made the host
wait for the GPU (``host_syncs``) and where: each wait stops the CPU from queueing kernels ahead of the GPU.
``TORCHDYNAMO_DISABLE=1`` runs every compiled region (RMSNorm, RoPE, SwiGLU, cross-entropy) eagerly, for an A/B.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from nemo_customizer.config.schema import ATTENTION_KERNELS, RECOMPUTE_MODULES

PEAK_TFLOPS = 989.0
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"lora-qv": ("lora", ["q_proj", "v_proj"]), "lora-all": ("lora", ALL_LINEAR), "full": ("all_weights", None),
         "full-bf16": ("all_weights", None)}
MODE_OVERRIDES = {"full-bf16": ["hyperparameters.fp32_master_weights=false"]}
"""full-bf16: full SFT without fp32 master weights (bf16 weights, gradients and moments; stochastic rounding), the
transformers+peft baseline's precision."""


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
    attention = sum(2 * 2 * q * sum(_keys_seen(L, window) for window in _layer_windows(arch))
                    for L in seq_lengths) / tokens  # causal fwd per token
    return k * n + attention * (3 if kind == "all_weights" else 2.5)


def _layer_windows(arch) -> list:
    """Each layer's attention window (None: the whole sequence), as ``models.llama.window_fields`` builds them."""
    if arch.sliding_window is None:
        return [None] * arch.num_hidden_layers
    types = arch.layer_types or ["sliding_attention"] * arch.num_hidden_layers
    return [arch.sliding_window if kind == "sliding_attention" else None for kind in types]


def _keys_seen(length: int, window) -> float:
    """Query-key pairs a causal layer computes over one sequence (≈ L²/2; a window W caps each query's keys)."""
    if window is None or length <= window:
        return length * length / 2
    return window * window / 2 + (length - window) * window


def run_ours(model_name: str, mode: str, seq: int, packed: bool, steps: int, warmup: int,
             profile_dir: str | None = None, bins_per_micro_batch: int = 1, tp: int = 1, sp: bool = False,
             cuda_graphs: bool = False, activation_checkpointing: bool = False,
             attention_kernel: str = "auto", synced_steps: bool = False, recompute_modules: tuple = (),
             equal_work: bool = False, precision: str = "bf16") -> dict:
    from nemo_customizer.config import compose_config
    from nemo_customizer.data.examples import TokenizedExample
    from nemo_customizer.data import collate
    from nemo_customizer.models.flash_attn4 import use_flash_attn4
    from nemo_customizer.models.llama import head_dim
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.pipelined import PipelinedSteps, PlannedStep
    from nemo_customizer.training.step import queue_step
    from nemo_customizer.training.step import train_step as _train_step

    kind, targets = MODES[mode]
    overrides = [f"model={model_name}", "model.random_weights=true", f"hyperparameters.finetuning_type={kind}",
                 "hyperparameters.lora.adapter_dim=16", "hyperparameters.lora.alpha=32",
                 "hyperparameters.lora.adapter_dropout=0.0", f"model.max_seq_length={seq}",
                 f"model.tensor_parallel_size={tp}", f"model.use_sequence_parallel={str(sp).lower()}",
                 f"model.attention_kernel={attention_kernel}", f"precision={precision}", "device=cuda",
                 "hyperparameters.seed=0", f"hyperparameters.cuda_graphs={str(cuda_graphs).lower()}",
                 f"hyperparameters.activation_checkpointing={str(activation_checkpointing).lower()}",
                 f"hyperparameters.recompute_modules=[{','.join(recompute_modules)}]"]
    if targets:
        overrides.append(f"hyperparameters.lora.target_modules=[{','.join(targets)}]")
    overrides += MODE_OVERRIDES.get(mode, [])
    cfg = compose_config(overrides)
    device = torch.device("cuda")
    # What earlier rows of a suite left allocated (some of it outlives them, most after a full fine-tuning row): not
    # counted in this row's peak.
    gc.collect()
    leftover = torch.cuda.memory_allocated()
    session = TrainingSession(cfg, checkpoint_dir=None)  # random weights; the parallel state is the session's
    try:
        session.build_model()
        session.build_training(steps + warmup, packed=packed)  # CUDA graphs when cuda_graphs and packed
        ddp, optimizer, scheduler, graphs = session.wrapped, session.optimizer, session.scheduler, session.graphs

        def train_step(*args):
            return _train_step(*args, graphs=graphs)

        stepping = PipelinedSteps(lambda micro: queue_step(ddp, optimizer, scheduler, micro, device, graphs), device)

        def queued_steps(micro_batches_per_step):
            """Each step queued before the previous one is read, by the training loop's own stepping."""
            return list(stepping(PlannedStep(number, micro) for number, micro in enumerate(micro_batches_per_step, 1)))

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
            bins = [[seq] if equal_work else example_lengths(seq, seed=step if k == 0 else step * 1000 + k)
                    for k in range(bins_per_micro_batch)]
            row = collate_packed([examples_of(b) for b in bins], pad_id=0, pad_to_multiple_of=tp if sp else 1)
            return [row], [n for b in bins for n in b]

        batches = [batch(i) for i in range(steps + warmup)]
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if synced_steps:  # each step alone: the GPU idles while the host prepares the next one
            times, results = [], []
            for i, (micro, _) in enumerate(batches):
                torch.cuda.synchronize()
                started = time.perf_counter()
                results.append(train_step(ddp, optimizer, scheduler, micro, device))
                torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - started)
        else:  # as the training loop runs: step N's numbers are read (a host sync) after step N+1 is queued
            read = queued_steps([micro for micro, _ in batches])
            results = [step.result for step in read]
            times = [step.seconds for step in read[warmup:]]  # after a warm-up step: from one read to the next
        step_s = statistics.median(times)
        syncs = _host_syncs(lambda: train_step(ddp, optimizer, scheduler, batches[-1][0], device))
        if profile_dir:
            few = [micro for micro, _ in batches[:3]]
            run_few = (lambda: [train_step(ddp, optimizer, scheduler, m, device) for m in few]) if synced_steps \
                else (lambda: queued_steps(few))
            name = (f"{model_name}-{mode}" + (f"-tp{tp}" if tp > 1 else "")
                    + ("" if precision == "bf16" else f"-{precision}"))
            _profile(run_few, Path(profile_dir) / name)
        lengths = [n for _, ls in batches[warmup:] for n in ls]
        tokens_per_step = sum(lengths) / steps
        tok_s = tokens_per_step / step_s / tp  # per GPU: the TP ranks share every token
        tflops = tok_s * model_flops_per_token(cfg.model.architecture, kind, lengths) / 1e12
        row = dict(impl="nemo_customizer", model=model_name, mode=mode, precision=precision, seq=seq, packed=packed,
                   tp=tp, sp=sp, work="equal" if packed and equal_work else "packed" if packed else "padded",
                    bins_per_micro_batch=bins_per_micro_batch if packed else None, tok_s=round(tok_s),
                    tflops=round(tflops), mfu=round(tflops / PEAK_TFLOPS, 3),
                    peak_gb=round((torch.cuda.max_memory_allocated() - leftover) / 2**30, 1),
                    step_ms=round(step_s * 1000, 1), resident_gb_before_steps=round((resident - leftover) / 2**30, 1),
                    leftover_gb=round(leftover / 2**30, 1),
                    host_syncs=syncs, compiled=not os.environ.get("TORCHDYNAMO_DISABLE"),
                    cuda_graphs=graphs is not None, activation_checkpointing=activation_checkpointing,
                    recompute_modules=list(recompute_modules),
                    step_timing="synced" if synced_steps else "queued",
                    attention="fa4" if packed and use_flash_attn4(attention_kernel, device,
                                                                  head_dim(cfg.model.architecture)) else "torch",
                    losses=[round(r.loss, 5) for r in results[:4]])
        print(f"measured (before teardown): {json.dumps(row)}", file=sys.stderr, flush=True)
        return row
    except BaseException:
        traceback.print_exc()  # now: tearing down process groups after a failed capture can hang
        raise
    finally:
        session.close()  # graphs released, then the parallel state
        torch.cuda.empty_cache()


def _host_syncs(step) -> dict:
    """Run ``step`` once under CUDA's sync debug mode: how often it waited for the GPU, by Python call site.
    A wait inside ``torch.cuda.synchronize`` is reported at its caller's line (``synchronize_callers``)."""
    import warnings

    from nemo_customizer.compat import count_cuda_synchronize_callers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with count_cuda_synchronize_callers() as callers:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()  # after the debug mode: this wait is the measurement's, not the step's
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            site = f"{Path(w.filename).name}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return dict(total=sum(sites.values()), sites=dict(sorted(sites.items(), key=lambda kv: -kv[1])[:8]),
                synchronize_callers=callers)


def _profile(run_steps, path: Path) -> None:
    """Kernel time table (top 40 by CUDA time) and a Chrome trace of a few steps (``run_steps()``), for finding what
    to speed up."""
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_steps()
        torch.cuda.synchronize()
    if int(os.environ.get("RANK", "0")):
        return  # every rank runs the steps (they meet in collectives); the first one writes
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    path.parent.joinpath(path.name + ".txt").write_text(table)  # not with_suffix: "llama-3.2-1b…" has dots
    prof.export_chrome_trace(str(path.parent / (path.name + ".json")))
    print(table, flush=True)


BASELINES = {"hf-peft": ("hf+peft", ["hf_peft_throughput.py", "--kernels", "torch"]),
             "liger": ("hf+peft+liger", ["hf_peft_throughput.py", "--kernels", "liger"]),
             "unsloth": ("unsloth", ["unsloth_throughput.py"])}
"""``--baseline`` names → (the row's ``impl``, the script under ``scripts/`` that measures it and its own options;
Unsloth loads and patches models its own way)."""


def run_baseline(model_name: str, mode: str, seq: int, rows: int = 1, baseline: str = "hf-peft") -> dict:
    """A transformers+peft baseline (``scripts/hf_peft_throughput.py``) or Unsloth (``scripts/unsloth_throughput.py``)
    on ``rows`` dense ``seq``-token sequences per step (rows = our bins per micro batch), its FLOPs counted as ours
    are. Each baseline runs in a process of its own: Liger and Unsloth patch ``transformers``' modules for the rest of
    a process, and the GPU starts empty."""
    import subprocess

    from nemo_customizer.config import config_from_kwargs

    impl, (script, *options) = BASELINES[baseline]
    kind, targets = MODES[mode]
    command = [sys.executable, str(Path(__file__).resolve().parent / script), *options, "--model", model_name,
               "--seq", str(seq), "--rows", str(rows)]
    command += ["--full"] if kind == "all_weights" else ["--targets", ",".join(targets)]
    torch.cuda.empty_cache()  # what this process keeps cached is not the baseline's to fight for
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        why = ("OOM: " if "OutOfMemoryError" in done.stderr else "unavailable: " if done.returncode == 2
               else "failed: ")
        return dict(impl=impl, model=model_name, mode=mode, error=why + " | ".join(tail))
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    arch = config_from_kwargs(config=model_name).model.architecture
    tflops = measured["tokens_per_s"] * model_flops_per_token(arch, kind, [seq] * rows) / 1e12
    return dict(impl=impl, model=model_name, mode=mode, seq=seq, packed=False, rows=rows,
                tok_s=round(measured["tokens_per_s"]), tflops=round(tflops), mfu=round(tflops / PEAK_TFLOPS, 3),
                peak_gb=round(measured["peak_gib"], 1), step_ms=round(measured["step_ms"], 1))


SUITE = [("llama-3.2-1b-instruct", "lora-qv"), ("llama-3.2-1b-instruct", "lora-all"),
         ("llama-3.2-1b-instruct", "full"), ("llama-3.2-1b-instruct", "full-bf16"),
         ("llama-3.1-8b-instruct", "lora-qv"), ("llama-3.1-8b-instruct", "lora-all")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default llama-3.2-1b-instruct; with --suite, only its rows")
    parser.add_argument("--mode", choices=sorted(MODES), default="lora-qv")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--packed", action="store_true", help="pack variable-length examples (mean ~600 tokens)")
    parser.add_argument("--suite", action="store_true", help="run the standard table (packed)")
    parser.add_argument("--baseline", nargs="?", const="hf-peft", default=None, metavar="NAMES",
                        help="also run baselines on each config, comma-separated: hf-peft (the default: "
                             "transformers+peft), liger (the same with Liger kernels), unsloth (Unsloth's "
                             "FastLanguageModel); scripts/hf_peft_throughput.py, scripts/unsloth_throughput.py")
    parser.add_argument("--equal-work", action="store_true",
                        help="each bin holds one causal SEQ-token sequence, the baselines' work (packed path)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--bins-per-micro-batch", type=int, default=1,
                        help="packed: this many SEQ-token bins per forward (the step is one micro batch); "
                             "the baseline then gets as many dense SEQ-token rows per step")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile 3 steps of ours: kernel table and Chrome trace per config in DIR")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch with torchrun, one process "
                                                          "per GPU); tokens/s is per GPU")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (with --tp > 1)")
    parser.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                        help="print every thread's stack and exit 1 if the run takes longer (a hung collective)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute every transformer layer in backward (ours)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="packed: replay each micro batch's forward+backward as a CUDA graph (ours)")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default="auto",
                        help="model.attention_kernel for packed batches (ours): auto takes FlashAttention-4 where "
                             "flash-attn-4 is installed")
    parser.add_argument("--recompute-modules", default="", metavar="MODULES",
                        help=f"selective recomputation, comma-separated: {', '.join(RECOMPUTE_MODULES)} (ours)")
    parser.add_argument("--synced-steps", action="store_true",
                        help="time each step alone (sync before and after) instead of as the training loop runs, "
                             "with the next step queued before a step's numbers are read")
    parser.add_argument("--precision", choices=("bf16", "fp8"), default="bf16",
                        help="ours: fp8 holds the frozen base of a LoRA job in FP8 (Hopper; models.fp8_linear)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first timed step starts when a warm-up step is read)")
    baselines = [name for name in (args.baseline or "").split(",") if name]
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        parser.error(f"--baseline {','.join(unknown)}: unknown; choose from {', '.join(BASELINES)}")
    if args.watchdog:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        print(f"error: --tp {args.tp} needs {args.tp} processes (torchrun --nproc-per-node {args.tp}), got {world}",
              file=sys.stderr)
        return 2
    if args.tp > 1 and baselines:
        print("error: the transformers+peft baseline runs on one GPU; leave out --baseline with --tp", file=sys.stderr)
        return 2
    if args.sp and args.tp == 1:
        print("error: --sp needs --tp > 1", file=sys.stderr)
        return 2
    leader = int(os.environ.get("RANK", "0")) == 0
    if leader:
        print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if args.suite:
        configs = [(m, mode) for m, mode in SUITE if args.model in (None, m)]
    else:
        configs = [(args.model or "llama-3.2-1b-instruct", args.mode)]
    rows = []
    for model_name, mode in configs:
        runs = [lambda: run_ours(model_name, mode, args.seq, args.packed or args.suite or args.equal_work, args.steps,
                                 args.warmup, args.profile, args.bins_per_micro_batch, args.tp, args.sp,
                                 args.cuda_graphs, args.activation_checkpointing, args.attention_kernel,
                                 args.synced_steps, tuple(m for m in args.recompute_modules.split(",") if m),
                                 args.equal_work, args.precision)]
        runs += [lambda name=name: run_baseline(model_name, mode, args.seq, args.bins_per_micro_batch, name)
                 for name in baselines]
        for fn in runs:
            try:
                row = fn()
            except torch.cuda.OutOfMemoryError as err:
                row = dict(model=model_name, mode=mode, error=f"OOM: {err}"[:200])
            row["card"] = torch.cuda.get_device_name()
            rows.append(row)
            if not leader:
                continue
            write_row(row, args.out)
    return 0


def write_row(row: dict, out: str | None) -> None:
    """One result row as a JSON line on stdout, and appended to ``out`` when given."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
