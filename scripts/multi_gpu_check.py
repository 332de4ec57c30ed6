"""Multi-GPU check: the same job at TP=1, TP=2, TP=2+SP, DP=2 and PP=2, compared step by step.

    python scripts/multi_gpu_check.py --model llama-3.1-8b-instruct --out results/   # on a 2-GPU machine
    python scripts/multi_gpu_check.py --model tiny-llama-test --device cpu          # the same flow on CPU (gloo)
    python scripts/multi_gpu_check.py --model llama-3.2-1b-instruct --finetuning all_weights \
        --layouts tp1,dp2,dp2-distopt                                               # full SFT, distributed optimizer
    python scripts/multi_gpu_check.py --peft-check results/job-tp2                  # adapter in peft vs ours
    python scripts/multi_gpu_check.py --model llama-3.2-1b-instruct --finetuning all_weights \
        --layouts dp2-distopt,dp2-distopt-resume                                    # cancel at step 3, resume

Writes one random-weight HF checkpoint of the model's architecture (so every layout starts from identical
weights), a synthetic packed dataset (example lengths log-normal, mean ~600 tokens), then runs
`torchrun -m nemo_customizer` once per layout — the user's own command line — and compares per-step train losses
and validation loss with TP=1, plus tokens/s per GPU and peak memory. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {  # name: (processes, overrides)
    "tp1": (1, []),
    "tp2": (2, ["model.tensor_parallel_size=2"]),
    "tp2sp": (2, ["model.tensor_parallel_size=2", "model.use_sequence_parallel=true"]),
    "dp2": (2, []),
    "pp2": (2, ["model.pipeline_parallel_size=2"]),
    "dp2-distopt": (2, ["hyperparameters.use_distributed_optimizer=true"]),
    # Packed micro batches replayed from CUDA graphs (training/graphs.py); at TP=2+SP the collectives are captured.
    "tp1-graphs": (1, ["hyperparameters.cuda_graphs=true"]),
    "dp2-graphs": (2, ["hyperparameters.cuda_graphs=true"]),
    "tp2sp-graphs": (2, ["model.tensor_parallel_size=2", "model.use_sequence_parallel=true",
                         "hyperparameters.cuda_graphs=true"]),
}
# name: (layout it repeats, step after which the job is cancelled). The job checkpoints and exits; the same command
# then resumes it, and the per-step losses must equal an uninterrupted run of that layout. `nemo_customizer cancel`,
# not SIGTERM: torchrun kills its workers 30 s after SIGTERM, too soon for a full fine-tune's checkpoint.
RESUMED = {"dp2-distopt-resume": ("dp2-distopt", 3), "tp2sp-resume": ("tp2sp", 3), "dp2-resume": ("dp2", 3),
           "tp2sp-graphs-resume": ("tp2sp-graphs", 3)}


def write_checkpoint(model_name: str, directory: Path, device: str) -> None:
    """Random weights in the model config's architecture, plus a byte-level tokenizer (any text encodes)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _tiny import hf_config, write_tiny_tokenizer
    from nemo_customizer.config import compose_config
    from transformers import LlamaForCausalLM

    arch = compose_config([f"model={model_name}"]).model.architecture
    config = hf_config(arch)
    config.head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    config.bos_token_id = arch.bos_token_id
    config.eos_token_id = list(arch.eos_token_ids) if arch.eos_token_ids else arch.eos_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory)


def write_dataset(directory: Path, rows: int, mean_chars: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("training.jsonl", rows), ("validation.jsonl", max(rows // 8, 8))):
        with open(directory / name, "w") as handle:
            for _ in range(n):
                length = int(min(max(rng.lognormvariate(0, 0.6) * mean_chars, 40), 6 * mean_chars))
                prompt = " ".join(rng.choice(words) for _ in range(length // 6))
                answer = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                handle.write(json.dumps({"prompt": prompt + "\nAnswer: ", "completion": answer}) + "\n")


def run_layout(name: str, args, root: Path) -> dict:
    base, interrupt_after = RESUMED.get(name, (name, None))
    processes, overrides = LAYOUTS[base]
    job = root / f"job-{name}"
    shutil.rmtree(job, ignore_errors=True)  # a rerun replaces the earlier job of this layout
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "nemo_customizer", f"model={args.model}", f"model.checkpoint={root / 'checkpoint'}",
               "model.random_weights=false",
               f"model.max_seq_length={args.seq}", f"dataset.path={root / 'data'}", f"output_dir={job}",
               f"device={args.device}", "progress_bar=false",
               "hyperparameters.sequence_packing_enabled=true", f"hyperparameters.max_steps={args.steps}",
               f"hyperparameters.batch_size={args.batch_size}", f"hyperparameters.micro_batch_size={args.micro_batch_size}",
               f"hyperparameters.finetuning_type={args.finetuning}",
               f"hyperparameters.learning_rate={1e-5 if args.finetuning == 'all_weights' else 1e-4}",
               "hyperparameters.lora.adapter_dim=16",
               "hyperparameters.lora.alpha=32", "hyperparameters.lora.adapter_dropout=0.0", *overrides]
    log = root / f"{name}.log"
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    with open(log, "w") as handle:
        if interrupt_after is not None:
            # Every rank finishes its step, checkpoints and exits 143; torchrun then reports a failed worker, so the
            # job's status is what tells.
            _run_until_step(command, env, handle, job, interrupt_after)
            state = json.loads((job / "status.json").read_text())
            if state["status"] != "cancelled":
                return dict(layout=name, error=f"interrupted run ended {state['status']!r}, not 'cancelled'; see "
                                               f"{log}: " + log.read_text()[-1500:])
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code:
        return dict(layout=name, error=f"exit {code}; see {log}: " + log.read_text()[-1500:])
    events = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    result = json.loads((job / "result.json").read_text())
    timed = train[2:] or train  # leave out warm-up steps
    tokens_per_s = sum(e["tokens"] for e in timed) / sum(e["tokens"] / e["tokens_per_s"] for e in timed)
    return dict(layout=name, gpus=processes, losses=[e["loss"] for e in train], val_loss=result["final_val_loss"],
                tokens_per_s_per_gpu=round(tokens_per_s / processes), peak_gib=round(result["peak_memory_gib"], 1),
                seconds=time.monotonic() - started)


def _run_until_step(command: list, env: dict, log, job: Path, step: int) -> int:
    """Start ``command``; once its metrics show training ``step``, cancel the job (as its user would) and wait."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics = job / "metrics.jsonl"
    while process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(line).get("event") == "train" and json.loads(line)["step"] >= step for line in lines):
            subprocess.check_call([sys.executable, "-m", "nemo_customizer", "cancel", str(job)], stdout=log, env=env)
            break
        time.sleep(0.5)
    return process.wait()


def check_peft(job: Path, device: str = "cuda", tokens: int = 512) -> dict:
    """The job's exported adapter in ``transformers`` + ``peft`` against our model with the same adapter (TP=1,
    fp32 on one device): relative difference of the logits on random tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nemo_customizer.config import config_from_file
    from nemo_customizer.models.gpt import forward_logits
    from nemo_customizer.peft.apply import apply_lora
    from nemo_customizer.peft.export import load_peft_adapter, read_lora_config
    from nemo_customizer.training.session import TrainingSession

    cfg = config_from_file(job / "config.yaml", ["model.tensor_parallel_size=1", "model.use_sequence_parallel=false",
                                                 "model.pipeline_parallel_size=1", f"device={device}",
                                                 "precision=fp32", "hyperparameters.seed=0"])
    device = torch.device(device)
    ids = torch.randint(0, cfg.model.architecture.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with TrainingSession(cfg, checkpoint_dir=cfg.model.checkpoint) as session:
        model = session.build_model(trainable=False)  # the base model; the job's adapter is attached as peft does
        apply_lora(model, cfg.model.architecture, read_lora_config(job / "adapter"), seed=0)
        load_peft_adapter(model, job / "adapter")
        with torch.no_grad():
            ours = forward_logits(model.eval(), ids.to(device)).float().cpu()
        del model
    torch.cuda.empty_cache()
    reference = AutoModelForCausalLM.from_pretrained(cfg.model.checkpoint, torch_dtype=torch.float32).to(device)
    reference = PeftModel.from_pretrained(reference, str(job / "adapter")).eval()
    with torch.no_grad():
        theirs = reference(ids.to(device)).logits.float().cpu()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    return dict(check=f"{job.name}: adapter in peft vs ours, fp32 logits of {tokens} tokens", rel=rel, ok=rel <= 1e-3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b-instruct")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layouts", default="tp1,tp2,tp2sp,dp2,pp2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step before packing (a multiple of 16)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro batch (validation is unpacked)")
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--mean-chars", type=int, default=600)
    parser.add_argument("--rtol", type=float, default=2e-2, help="per-step loss tolerance against TP=1")
    parser.add_argument("--out", default="multi_gpu_check")
    parser.add_argument("--finetuning", default="lora", choices=["lora", "all_weights"])
    parser.add_argument("--peft-check", default=None, metavar="JOB_DIR",
                        help="only compare that LoRA job's exported adapter in peft with ours, then exit")
    args = parser.parse_args(argv)
    if args.peft_check:
        result = check_peft(Path(args.peft_check).resolve(), args.device)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "checkpoint" / "config.json").exists():
        write_checkpoint(args.model, root / "checkpoint", args.device)
    write_dataset(root / "data", args.rows, args.mean_chars)
    # Each layout is reported (and results.json rewritten) as soon as it ends: a run cut short by a time limit
    # keeps what it measured. The first layout is the reference (list tp1 first).
    results, reference, ok = [], None, True
    for name in args.layouts.split(","):
        r = run_layout(name, args, root)
        results.append(r)
        if "error" in r:
            ok = False
            print(f"FAIL {r['layout']}: {r['error']}", flush=True)
        else:
            reference = reference or r
            worst = max((abs(a - b) / abs(b) for a, b in zip(r["losses"], reference["losses"])), default=0.0)
            r["worst_rel_vs_reference"] = worst
            good = len(r["losses"]) == len(reference["losses"]) and worst <= args.rtol
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} {r['layout']:11} gpus={r['gpus']} "
                  f"tokens/s/GPU={r['tokens_per_s_per_gpu']:>7} peak={r['peak_gib']} GiB val={r['val_loss']:.4f} "
                  f"seconds={r['seconds']:.0f} worst step-loss diff vs {reference['layout']} {worst:.2e}", flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
