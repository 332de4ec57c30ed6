"""Command line: train with Hydra overrides, list model configs, generate text.

    python -m nemo_customizer [--cfg] [OVERRIDE ...]          train (model=... dataset.path=... hyperparameters.*=...)
    python -m nemo_customizer configs [--json]                list the shipped model configs
    python -m nemo_customizer generate [options] [OVERRIDE ...]

Config mistakes print one ``error:`` line to stderr and exit with status 2. Heavy modules (torch, megatron) are
imported only after the config is valid.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable, Sequence

from .config import ConfigError, compose_config, configs, validate_config
from .config.schema import Config

PROG = "python -m nemo_customizer"
CONFIG_ERROR_EXIT = 2
_OVERRIDES_HELP = "Hydra overrides such as model=llama-3.2-1b-instruct dataset.path=data/ hyperparameters.epochs=2"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in _COMMANDS else "train"
    if name != "train":
        argv = argv[1:]
    try:
        return _COMMANDS[name](argv)
    except Exception as exc:
        from .data.errors import DatasetError  # imported late: the data package pulls in torch

        if not isinstance(exc, (ConfigError, DatasetError, FileExistsError, PermissionError)):
            raise
        # User input problems (config keys, dataset rows, output directory): one clear message, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a model (LoRA SFT) on a JSONL dataset. Other commands: 'configs' lists the model "
                    "configs, 'generate' runs inference (each has --help).",
    )
    parser.add_argument("--cfg", action="store_true", help="print the composed config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=_OVERRIDES_HELP)
    args = parser.parse_intermixed_args(argv)
    cfg = compose_config(args.overrides)
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return 0
    _validate(cfg, training=True)
    from .api import run

    print(repr(run(cfg)))
    return 0


def _configs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} configs", description="List the shipped model configs.")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    rows = configs()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "max_seq_length", "tensor_parallel", "sequence_parallel", "packing", "parameters")
    table = [header] + [
        (r["name"], str(r["max_seq_length"]), str(r["tensor_parallel_size"]), _yes(r["use_sequence_parallel"]),
         _yes(r["sequence_packing_supported"]), _human(r["num_parameters"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} generate",
        description="Generate a completion from a base model, optionally with a trained LoRA adapter.",
    )
    parser.add_argument("--adapter", metavar="DIR", help="HF PEFT adapter directory written by a customization job")
    parser.add_argument("--prompt", metavar="TEXT", help="prompt text (default: read standard input)")
    parser.add_argument("--max-tokens", type=int, default=128, metavar="N", help="new tokens to generate (128)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0)")
    parser.add_argument("--stop", action="append", metavar="S", help="stop string; repeat for several")
    parser.add_argument("--seed", type=int, metavar="N", help="sampling seed (default: hyperparameters.seed)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides selecting the model, such as model=llama-3.2-1b-instruct "
                             "model.checkpoint=/path/to/hf_checkpoint")
    args = parser.parse_intermixed_args(argv)
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}.")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be 0 or more, got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}.")
    cfg = compose_config(args.overrides)
    _validate(cfg, training=False)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ConfigError("no prompt: pass --prompt TEXT or pipe the prompt on standard input.")
        prompt = sys.stdin.read()
    from .inference import generate

    text = generate(prompt, config=cfg, adapter=args.adapter, max_tokens=args.max_tokens,
                    temperature=args.temperature, top_p=args.top_p, stop=args.stop,
                    seed=cfg.hyperparameters.seed if args.seed is None else args.seed)
    print(text)
    return 0


def _validate(cfg: Config, *, training: bool) -> None:
    """validate_config, with its warnings printed as short ``warning:`` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_config(cfg, training=training)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _human(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


_COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": _train, "configs": _configs, "generate": _generate}
