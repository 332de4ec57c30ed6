"""GPU throughput of our LoRA DPO training (``training_type: dpo``) beside TRL's ``DPOTrainer`` with peft, in one
process, on the same random-token pairs.

    python scripts/dpo_benchmark.py                                   # llama-3.1-8b-instruct, LoRA q,v, ours + TRL
    python scripts/dpo_benchmark.py --mode lora-all --out dpo.jsonl
    python scripts/dpo_benchmark.py --device cpu --model smollm2-135m-instruct --steps 2 --warmup 1 \\
        --prompt 16 --completion 16 --pairs-per-step 2 --micro-batch 1          # a smoke run

Both sides: random weights of the same architecture (ours ``model.random_weights``; TRL's the transformers model
of our config, ``hf_peft_throughput.baseline_model``), LoRA rank 16, alpha 32, no dropout, β (``--beta``), the
sigmoid loss, ``--pairs-per-step`` pairs per optimizer step in micro batches of ``--micro-batch`` pairs, bf16 on
CUDA (fp32 on the CPU). Each pair is ``--prompt`` random prompt tokens followed by ``--completion`` random chosen and
as many random rejected tokens; tokens/s counts prompt + chosen + rejected tokens of each pair.

The reference log-probabilities: ours computes them once, in a forward-only pass over the pairs with the LoRA
adapters switched off, before the first step (``ref_pass_s``); TRL does the same with ``precompute_ref_log_probs``
(``--trl-reference per-step``: TRL's default instead, the reference forward with adapters disabled inside every
step, labelled in the row). TRL runs with gradient checkpointing off (its DPO default is on; ours recomputes
nothing) unless ``--trl-gradient-checkpointing``.

A step's time: ours as ``scripts/benchmark.py`` times it (``training.pipelined.PipelinedSteps``: from one step's read
to the next); TRL's from one optimizer step's end to the next (a device sync at each end). Median of the timed
steps after ``--warmup``. TRL needs ``trl`` and ``datasets`` importable (``trl`` imports ``datasets``, which imports
``pyarrow`` and ``pandas``); without them its row says why it was skipped.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import ALL_LINEAR, model_flops_per_token, write_row  # noqa: E402  (a script beside this one)

MODES = {"lora-qv": ["q_proj", "v_proj"], "lora-all": ALL_LINEAR}
RANK, ALPHA = 16, 32


@dataclass(frozen=True)
class Workload:
    """What both implementations train on: the pairs' shape, the batch and the loss settings."""

    model: str
    mode: str
    prompt: int
    completion: int
    pairs_per_step: int
    micro_batch: int
    beta: float
    steps: int
    warmup: int
    device: str

    @property
    def tokens_per_pair(self) -> int:
        return self.prompt + 2 * self.completion

    @property
    def n_pairs(self) -> int:
        return self.pairs_per_step * (self.steps + self.warmup)

    def random_pairs(self, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
        """``(prompt, chosen, rejected)`` token lists, the same for both implementations."""
        gen = torch.Generator().manual_seed(0)

        def tokens(n):
            return torch.randint(0, vocab, (n,), generator=gen).tolist()

        return [(tokens(self.prompt), tokens(self.completion), tokens(self.completion)) for _ in range(self.n_pairs)]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str):
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None


def _row(impl: str, work: Workload, arch, step_s: float, ref_pass_s, peak_gb, **extra) -> dict:
    """The row of one implementation: pairs/s, tokens/s, TFLOP/s as ``benchmark.py`` counts them (LoRA: 4·N per
    token + attention), median step, peak memory and the one-time reference pass."""
    tok_s = work.pairs_per_step * work.tokens_per_pair / step_s
    lengths = [work.prompt + work.completion] * (2 * work.pairs_per_step)
    tflops = tok_s * model_flops_per_token(arch, "lora", lengths) / 1e12
    return dict(impl=impl, model=work.model, mode=work.mode, prompt=work.prompt, completion=work.completion,
                pairs_per_step=work.pairs_per_step, micro_batch=work.micro_batch, beta=work.beta,
                pairs_s=round(work.pairs_per_step / step_s, 2), tok_s=round(tok_s), tflops=round(tflops, 1),
                step_ms=round(step_s * 1000, 1), peak_gb=peak_gb,
                ref_pass_s=None if ref_pass_s is None else round(ref_pass_s, 2), **extra)


# --- ours --------------------------------------------------------------------------------------------------------


def run_ours(work: Workload) -> dict:
    from nemo_customizer.config import compose_config
    from nemo_customizer.data import TokenizedExample, TokenizedPair
    from nemo_customizer.training.pipelined import PipelinedSteps, PlannedStep
    from nemo_customizer.training.preference import PreferenceLoss, ScoredPair, reference_log_probs
    from nemo_customizer.training.session import TrainingSession
    from nemo_customizer.training.step import queue_step

    targets = MODES[work.mode]
    cfg = compose_config([
        f"model={work.model}", "model.random_weights=true", f"model.max_seq_length={work.prompt + work.completion}",
        "hyperparameters.training_type=dpo", "hyperparameters.finetuning_type=lora",
        f"hyperparameters.lora.adapter_dim={RANK}", f"hyperparameters.lora.alpha={ALPHA}",
        "hyperparameters.lora.adapter_dropout=0.0", f"hyperparameters.lora.target_modules=[{','.join(targets)}]",
        f"hyperparameters.batch_size={work.pairs_per_step}", f"hyperparameters.micro_batch_size={work.micro_batch}",
        f"hyperparameters.dpo.ref_policy_kl_penalty={work.beta}", "hyperparameters.seed=0",
        f"precision={'bf16' if work.device == 'cuda' else 'fp32'}", f"device={work.device}"])
    device = torch.device(work.device)
    arch = cfg.model.architecture

    def sequence(prompt, response):
        return TokenizedExample(prompt + response, [0] * len(prompt) + [1] * len(response))

    pairs = [TokenizedPair(sequence(p, c), sequence(p, r)) for p, c, r in work.random_pairs(arch.vocab_size)]
    gc.collect()
    if work.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    session = TrainingSession(cfg, checkpoint_dir=None)  # random weights; the parallel state is the session's
    try:
        session.build_model()
        ddp = session.build_training(work.steps + work.warmup)
        _synchronize(work.device)
        started = time.perf_counter()
        table = reference_log_probs(ddp, pairs, batch_size=work.pairs_per_step, micro_batch_size=work.micro_batch,
                                    layout=session.layout, pad_id=0, pad_to_multiple_of=1)
        ref_pass_s = time.perf_counter() - started  # the table is on the host: the pass is over
        objective = PreferenceLoss(cfg.hyperparameters.dpo)
        scored = [ScoredPair(pair, tuple(row)) for pair, row in zip(pairs, table.tolist())]
        per_step, micro = work.pairs_per_step, work.micro_batch
        steps = [[objective.collate(scored[first + k:first + k + micro], pad_id=0, pad_to_multiple_of=1)
                  for k in range(0, per_step, micro)] for first in range(0, len(scored), per_step)]
        stepping = PipelinedSteps(lambda batches: queue_step(ddp, session.optimizer, session.scheduler, batches,
                                                             device, objective=objective), device)
        read = list(stepping(PlannedStep(number, batches) for number, batches in enumerate(steps, 1)))
        step_s = statistics.median(step.seconds for step in read[work.warmup:])
        first = objective.metrics(read[0].result.report, read[0].result.loss_tokens)
        return _row("nemo_customizer", work, arch, step_s, ref_pass_s, _peak_gb(work.device),
                    reference="precomputed", losses=[round(step.result.loss, 5) for step in read[:4]],
                    first_step_reward_accuracy=round(first["reward_accuracy"], 3))
    finally:
        session.close()
        if work.device == "cuda":
            torch.cuda.empty_cache()


# --- TRL ---------------------------------------------------------------------------------------------------------


def run_trl(work: Workload, per_step_reference: bool, gradient_checkpointing: bool) -> dict:
    """TRL's ``DPOTrainer`` + peft on the same pairs, or a row saying why it could not run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download; no telemetry ping either
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import trl
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError as err:
        return dict(impl="trl", model=work.model, mode=work.mode,
                    skipped=f"trl's DPOTrainer does not import ({err}): it needs trl, datasets, pyarrow and pandas")
    from peft import LoraConfig
    from transformers import TrainerCallback

    from hf_peft_throughput import baseline_model

    dtype = torch.bfloat16 if work.device == "cuda" else torch.float32
    model, arch = baseline_model(work.model, device=work.device, dtype=dtype)
    dataset = Dataset.from_list([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                 for p, c, r in work.random_pairs(arch.vocab_size)])

    class StepEnds(TrainerCallback):
        """When each optimizer step ended (after a device sync)."""

        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(work.device)
            self.ends.append(time.perf_counter())

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's trainer on pairs that are token ids already (``prompt_ids``/``chosen_ids``/``rejected_ids``, the
        columns its own tokenization writes), with its reference pass timed."""

        ref_pass_s = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            _synchronize(work.device)
            started = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            _synchronize(work.device)
            type(self).ref_pass_s = time.perf_counter() - started
            return out

    with tempfile.TemporaryDirectory() as scratch:
        config = DPOConfig(
            output_dir=scratch, beta=work.beta, loss_type=["sigmoid"], learning_rate=1e-4,
            per_device_train_batch_size=work.micro_batch,
            gradient_accumulation_steps=work.pairs_per_step // work.micro_batch,
            max_steps=work.steps + work.warmup, max_length=work.prompt + work.completion,
            precompute_ref_log_probs=not per_step_reference, gradient_checkpointing=gradient_checkpointing,
            bf16=work.device == "cuda", use_cpu=work.device == "cpu", seed=0, data_seed=0, save_strategy="no",
            eval_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            lr_scheduler_type="constant", warmup_steps=0)
        lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODES[work.mode], bias="none",
                          task_type="CAUSAL_LM")
        timer = StepEnds()
        if work.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=dataset,
                                         processing_class=_placeholder_tokenizer(), peft_config=lora,
                                         callbacks=[timer])
        trainer.train()
        peak = _peak_gb(work.device)
        step_s = statistics.median(b - a for a, b in zip(timer.ends[work.warmup - 1:], timer.ends[work.warmup:]))
        losses = [round(entry["loss"], 5) for entry in trainer.state.log_history if "loss" in entry][:4]
        accuracy = [entry.get("rewards/accuracies") for entry in trainer.state.log_history if "loss" in entry][:1]
        del trainer, model
        gc.collect()
        if work.device == "cuda":
            torch.cuda.empty_cache()
    return _row("trl", work, arch, step_s, PretokenizedDPOTrainer.ref_pass_s, peak,
                reference="per-step (adapters disabled)" if per_step_reference else "precomputed",
                gradient_checkpointing=gradient_checkpointing, trl=trl.__version__, losses=losses,
                first_step_reward_accuracy=accuracy[0] if accuracy else None)


def _placeholder_tokenizer():
    """A two-token tokenizer: the pairs are token ids already, TRL reads only its pad and EOS ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<pad>": 0, "<eos>": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


# --- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b-instruct", help="one of our model configs")
    parser.add_argument("--mode", choices=sorted(MODES), default="lora-qv")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per pair")
    parser.add_argument("--completion", type=int, default=512, help="tokens of each response (chosen, rejected)")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2, help="pairs per forward/backward")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--impl", default="ours,trl", help="comma-separated: ours, trl")
    parser.add_argument("--trl-reference", choices=["precomputed", "per-step"], default="precomputed",
                        help="TRL's reference: precompute_ref_log_probs (as ours), or its default per-step forward")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's DPO default (off here: ours recomputes nothing)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first timed step starts when a warm-up step ends)")
    if args.pairs_per_step % args.micro_batch:
        parser.error("--pairs-per-step must be a multiple of --micro-batch")
    impls = [name for name in args.impl.split(",") if name]
    if set(impls) - {"ours", "trl"}:
        parser.error(f"--impl takes ours and trl, got {args.impl}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU (--device cpu for a smoke run)", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"card: {card}  torch {torch.__version__}", flush=True)
    work = Workload(args.model, args.mode, args.prompt, args.completion, args.pairs_per_step, args.micro_batch,
                    args.beta, args.steps, args.warmup, args.device)
    runs = {"ours": lambda: run_ours(work),
            "trl": lambda: run_trl(work, args.trl_reference == "per-step", args.trl_gradient_checkpointing)}
    for name in impls:
        try:
            row = runs[name]()
        except torch.cuda.OutOfMemoryError as err:
            row = dict(impl=name, model=work.model, mode=work.mode, error=f"OOM: {err}"[:200])
        row["card"] = card
        write_row(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
