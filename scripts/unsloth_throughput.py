"""Training throughput of the Unsloth baseline on a CUDA GPU, for ``scripts/benchmark.py --baseline unsloth``.

Measured as ``scripts/hf_peft_throughput.py`` measures the transformers+peft baseline: the same architecture as our
model config with random weights in bf16, LoRA (rank 16, alpha 32, no dropout) on the given targets or every weight
for full fine-tuning, torch's fused AdamW, ``rows`` dense causal sequences of ``seq`` tokens per step, each step
synchronized, the median of the timed steps after the warm-up. Unsloth loads a model only from a checkpoint, so the
random-weight model is saved (with a small word-level tokenizer beside it) to a temporary directory first and loaded
back through ``FastLanguageModel.from_pretrained`` in bf16: no 4-bit quantization and no gradient checkpointing (our
runs do not recompute either). The temporary checkpoint is deleted before the steps run.

Unsloth patches ``transformers`` when it is imported, so it is imported before anything that imports
``transformers``, and this script runs in a process of its own. Without a CUDA GPU, or without an importable Unsloth,
it exits with status 2 and says why.

    python scripts/unsloth_throughput.py --model llama-3.1-8b-instruct --targets q_proj,v_proj
    python scripts/unsloth_throughput.py --model llama-3.2-1b-instruct --full
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peft_throughput import baseline_arguments, baseline_model, timed_training_steps  # noqa: E402  (imports transformers lazily)

UNAVAILABLE = 2
"""Exit status when the baseline cannot run here (no CUDA GPU, or Unsloth does not import)."""


def import_unsloth():
    """Unsloth's ``FastLanguageModel``, imported before ``transformers`` (Unsloth patches it at import); a
    ``SystemExit`` with status 2 and the reason when there is no CUDA GPU or Unsloth does not import."""
    if not torch.cuda.is_available():
        print("error: the Unsloth baseline needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(UNAVAILABLE)
    if "transformers" in sys.modules:
        print("warning: transformers was imported before unsloth; Unsloth's patches may be partial", file=sys.stderr)
    # No hub access from the benchmark: the checkpoint is local, and Unsloth skips its usage statistics offline.
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
        os.environ.setdefault(flag, "1")
    try:
        from unsloth import FastLanguageModel  # importing unsloth patches transformers
    except Exception as err:  # Unsloth raises more than ImportError when a dependency or the GPU does not fit it
        print(f"error: Unsloth does not import here ({type(err).__name__}: {err})", file=sys.stderr)
        raise SystemExit(UNAVAILABLE) from err
    return FastLanguageModel


def save_random_checkpoint(model_name: str, directory: Path):
    """Our model config ``model_name`` as a ``transformers`` checkpoint with random weights (bf16) and a small
    word-level tokenizer in ``directory``; returns the architecture."""
    model, arch = baseline_model(model_name)  # the transformers+peft baseline's random-weight model
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    _word_level_tokenizer().save_pretrained(directory)
    return arch


def _word_level_tokenizer():
    """A tokenizer Unsloth can load beside the checkpoint; the steps feed random token ids, so its vocabulary only
    has to hold the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(special)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def measure(model_name: str, *, targets: Optional[Sequence[str]], seq: int = 4096, rows: int = 1, steps: int = 10,
            warmup: int = 3, rank: int = 16, alpha: int = 32, checkpoint_root: Optional[str] = None) -> dict:
    """Tokens/s, median step time and peak memory of the Unsloth baseline; ``targets=None`` is full fine-tuning."""
    fast_model = import_unsloth()
    directory = Path(tempfile.mkdtemp(prefix="unsloth-baseline-", dir=checkpoint_root))
    try:
        arch = save_random_checkpoint(model_name, directory)
        model, _ = fast_model.from_pretrained(
            model_name=str(directory), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=False,
            load_in_8bit=False, full_finetuning=targets is None, use_gradient_checkpointing=False,
            fix_tokenizer=False, device_map={"": 0})
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the weights are on the GPU now; an 8B checkpoint is large
    if targets is not None:
        model = fast_model.get_peft_model(model, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                          target_modules=list(targets), bias="none",
                                          use_gradient_checkpointing=False, random_state=0)
    model.train()
    measured = timed_training_steps(model, arch.vocab_size, rows=rows, seq=seq, steps=steps, warmup=warmup)
    return dict(measured, unsloth_version=_version("unsloth"))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv=None) -> int:
    parser = baseline_arguments(__doc__)
    parser.add_argument("--checkpoint-root", default=None, metavar="DIR",
                        help="where the temporary random-weight checkpoint goes (default: the system temp dir)")
    args = parser.parse_args(argv)
    targets = None if args.full else [t for t in args.targets.split(",") if t]
    try:
        result = measure(args.model, targets=targets, seq=args.seq, rows=args.rows, steps=args.steps,
                         warmup=args.warmup, checkpoint_root=args.checkpoint_root)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else UNAVAILABLE
    print(json.dumps(dict(model=args.model, targets=targets, seq=args.seq, rows=args.rows, kernels="unsloth",
                          **result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
