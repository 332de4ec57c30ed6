"""Command line: train with Hydra overrides, list model configs, generate text, manage stored datasets.

    python -m nemo_customizer [--cfg] [OVERRIDE ...]          train (model=... dataset.path=... hyperparameters.*=...)
    python -m nemo_customizer --config-path DIR --config-name JOB [OVERRIDE ...]   train a job file of one's own
    python -m nemo_customizer -m KEY=A,B [KEY=C,D ...]       a sweep: one job per combination, then a table
    python -m nemo_customizer configs [--json] [--config-dir DIR]   list the model configs (shipped, and DIR's)
    python -m nemo_customizer generate [options] [OVERRIDE ...]
    python -m nemo_customizer serve [OVERRIDE ...]            OpenAI-compatible server (model=... adapters_dir=...)
    python -m nemo_customizer datasets upload PATH --name NAME [--model M] [--overwrite] [OVERRIDE ...]
    python -m nemo_customizer datasets list | show NAME | delete NAME
    python -m nemo_customizer status JOB_DIR [--json]        a job's state and progress (its status.json)
    python -m nemo_customizer cancel JOB_DIR                 stop a running job after its step, with a checkpoint
    python -m nemo_customizer export JOB_DIR [--output DIR] [OVERRIDE ...]   a checkpoint as HF adapter/model files
    python -m nemo_customizer evaluate --data FILE [--adapter DIR | --job JOB_DIR] [--compare-base] [OVERRIDE ...]

Config mistakes print one ``error:`` line to stderr and exit with status 2. A training job stopped by SIGINT,
SIGTERM or ``cancel`` (it finishes its step and saves first) exits with 130 or 143 (143 for ``cancel``), the shell's
codes for those signals. Heavy modules (torch, megatron) are imported only after the config is valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .config import (
    ConfigError,
    ConfigSearch,
    ConfigWarning,
    compose_config,
    config_search,
    configs,
    validate_config,
    validate_serving,
)
from .config.compose import DEFAULT_MODEL
from .config.schema import Config

PROG = "python -m nemo_customizer"
CONFIG_ERROR_EXIT = 2
_OVERRIDES_HELP = "Hydra overrides such as model=llama-3.2-1b-instruct dataset.path=data/ hyperparameters.epochs=2"
_CFG_CHOICES = ("job", "hydra", "all")  # Hydra's --cfg values; only the job's config exists here


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name, argv = _command_of(argv)
    try:
        return _COMMANDS[name].run(argv)
    except Exception as exc:
        from .data.errors import DatasetError  # imported late: the data package pulls in torch
        from .training.trackers import TrackerError

        if not isinstance(exc, (ConfigError, DatasetError, TrackerError, FileExistsError, PermissionError)):
            raise
        # User input problems (config keys, dataset rows, tracker settings, output directory): one clear message,
        # no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_ERROR_EXIT


def _command_of(argv: list[str]) -> tuple[str, list[str]]:
    """The command and its arguments. Config folders may come before ``configs`` as before training
    (``--config-dir DIR configs``): they are passed on to it."""
    if argv and argv[0] in _COMMANDS:
        return argv[0], argv[1:]
    at = 0
    while at < len(argv) and argv[at].split("=", 1)[0] in _FOLDER_OPTIONS:
        at += 1 if "=" in argv[at] else 2
    if 0 < at < len(argv) and argv[at] == "configs":
        return "configs", argv[at + 1:] + argv[:at]
    return "train", argv


_FOLDER_OPTIONS = ("--config-dir", "-cd", "--config-path", "-cp")


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill("Fine-tune a model (LoRA or full SFT, DPO) on a dataset, with a config composed "
                                  "from a shipped model config, a job file of your own (--config-path/--config-name) "
                                  "and Hydra overrides.", 100),
        epilog="commands (each has --help):\n" + "\n".join(f"  {name:<9} {command.summary}"
                                                          for name, command in _COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_search_options(parser)
    parser.add_argument("--cfg", "-c", choices=_CFG_CHOICES,
                        help="print the composed config as YAML and exit, once it passes the checks the run makes "
                             "before reading data (an error otherwise, exit status 2); with -m, every job's")
    parser.add_argument("--multirun", "-m", action="store_true",
                        help="sweep: KEY=A,B (or choice(A,B), range(N,M)) runs one job per combination, one after "
                             "another, each in output_dir/<number>_<key>=<value>,...; every combination is checked "
                             "first; a failed job is recorded and the sweep goes on (exit status 1 if any failed); "
                             "the table of settings and best validation loss is output_dir/sweep.csv")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=_OVERRIDES_HELP)
    args = parser.parse_intermixed_args(_hydra_cfg_option(argv))
    if args.cfg not in (None, "job"):
        raise ConfigError(f"--cfg {args.cfg}: there is no Hydra runtime config here (jobs are composed, not run by "
                          "hydra.main); --cfg job prints the job's config.")
    search = _config_search(args)
    if args.multirun:
        return _sweep(args.overrides, search, print_only=bool(args.cfg))
    cfg = compose_config(args.overrides, search=search)
    if args.cfg:
        _check_job(cfg)
        print(_yaml(cfg), end="")
        return 0
    _validate(cfg, training=True)
    from .api import run  # run() checks the rest of what _check_job checks, first
    from .training.status import JobCancelled

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)  # validate_config's, printed just above
            result = run(cfg)
    except JobCancelled as cancelled:
        print(f"{cancelled} (status: {cfg.output_dir}/status.json)", file=sys.stderr)
        return cancelled.exit_code
    print(repr(result))
    return 0


def _sweep(overrides: list[str], search: ConfigSearch, *, print_only: bool) -> int:
    """``-m``: plan every job (each checked as a run checks it), then print their configs or run them in turn."""
    from .sweep import FAILED, format_table, is_main_process, plan_sweep, run_sweep

    warned: set[str] = set()
    sweep = plan_sweep(overrides, search, check=lambda cfg: _check_job(cfg, warned))
    if print_only:
        print("---\n".join(f"# job {job.number}: {job.label}\n{_yaml(job.cfg)}" for job in sweep.jobs), end="")
        return 0
    from .api import run
    from .training.status import JobCancelled

    is_main = is_main_process()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if is_main else (lambda line: None)
    try:
        rows = run_sweep(sweep, run, is_main=is_main, log=log)
    except JobCancelled as cancelled:
        log(f"{cancelled}: the sweep stops (table: {sweep.table_path}); the same command resumes it")
        return cancelled.exit_code
    if is_main:
        print(format_table(sweep, rows))
        print(f"jobs in {sweep.directory}/, table in {sweep.table_path}")
        for row in rows:
            if row.status == FAILED:
                print(f"job {row.job.number} failed: {row.error}")
    return 1 if any(row.status == FAILED for row in rows) else 0


def _check_job(cfg: Config, warned: set[str] | None = None) -> None:
    """What a training run checks before it reads any data: the config's values (warnings printed), then the
    parallel layout, the device and the output directory (``api.check_before_work``)."""
    _validate(cfg, training=True, warned=warned)
    from .api import check_before_work  # imported late: it pulls in torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # validate_config's, printed just above
        check_before_work(cfg)


def _add_config_search_options(parser: argparse.ArgumentParser) -> None:
    """Hydra's options for configs of one's own: a job file, and folders searched for ``model/NAME.yaml``."""
    parser.add_argument("--config-path", "-cp", metavar="DIR",
                        help="folder of the job file (default: the current one); its model/ folder holds model "
                             "configs of your own")
    parser.add_argument("--config-name", "-cn", metavar="JOB",
                        help="a job file, DIR/JOB.yaml: defaults: [{model: NAME}, _self_] and any keys to set; "
                             "overrides apply on top")
    parser.add_argument("--config-dir", "-cd", metavar="DIR", action="append",
                        help="a folder searched before the shipped configs: DIR/model/NAME.yaml is model=NAME "
                             "(repeatable)")


def _config_search(args: argparse.Namespace) -> ConfigSearch:
    if args.config_path is not None and args.config_name is None:
        raise ConfigError(f"--config-path {args.config_path} needs --config-name JOB (the job file "
                          f"{args.config_path}/JOB.yaml).")
    job = Path(args.config_path or ".", args.config_name) if args.config_name else None
    return config_search(job, args.config_dir or ())


def _hydra_cfg_option(argv: list[str]) -> list[str]:
    """Hydra spells ``--cfg job`` (the value optional): make that one argument, so a bare ``--cfg`` does not take
    the override after it as its value."""
    out: list[str] = []
    rest = iter(argv)
    for arg in rest:
        if arg not in ("--cfg", "-c"):
            out.append(arg)
            continue
        value = next(rest, None)
        if value in _CFG_CHOICES:
            out.append(f"--cfg={value}")
        else:
            out.append("--cfg=job")
            if value is not None:
                out.append(value)
    return out


def _yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _configs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} configs", description="List the shipped model configs, and "
                                     "those of your own in --config-dir / --config-path folders (DIR/model/*.yaml).")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--config-dir", "-cd", metavar="DIR", action="append", default=[],
                        help="also list DIR/model/*.yaml, as a job run with --config-dir DIR finds them (repeatable)")
    parser.add_argument("--config-path", "-cp", metavar="DIR",
                        help="also list DIR/model/*.yaml, as a job file in DIR finds them")
    args = parser.parse_args(argv)
    dirs = ([args.config_path] if args.config_path else []) + args.config_dir  # the order a job searches them
    rows = configs(config_dir=dirs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(("name", "max_seq_length", "tensor_parallel", "sequence_parallel", "packing", "parameters")
                 + (("from",) if dirs else ()),
                 [(r["name"], str(r["max_seq_length"]), str(r["tensor_parallel_size"]),
                   _yes(r["use_sequence_parallel"]), _yes(r["sequence_packing_supported"]),
                   _human(r["num_parameters"])) + ((r.get("config_dir", "shipped"),) if dirs else ())
                  for r in rows])
    return 0


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} generate",
        description="Generate a completion from a base model, optionally with a trained LoRA adapter; with "
                    "--messages, answer a chat conversation and print the assistant message as JSON.",
    )
    parser.add_argument("--adapter", metavar="DIR", help="HF PEFT adapter directory written by a customization job")
    parser.add_argument("--prompt", metavar="TEXT", help="prompt text (default: read standard input)")
    parser.add_argument("--messages", metavar="FILE",
                        help="chat instead of a prompt: a JSON file ('-' reads standard input) holding a list of "
                             "OpenAI messages, or {\"messages\": [...], \"tools\": [...]}; rendered with the "
                             "model's chat template")
    parser.add_argument("--tool-syntax", choices=("hermes", "llama3", "mistral", "mistral_args", "none"),
                        help="tool-call syntax to parse (default: detected from the chat template)")
    parser.add_argument("--max-tokens", type=int, default=128, metavar="N", help="new tokens to generate (128)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0)")
    parser.add_argument("--stop", action="append", metavar="S", help="stop string; repeat for several")
    parser.add_argument("--seed", type=int, metavar="N", help="sampling seed (default: hyperparameters.seed)")
    _add_config_search_options(parser)
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
    if args.messages is not None and args.prompt is not None:
        raise ConfigError("pass --prompt or --messages, not both.")
    cfg = compose_config(args.overrides, search=_config_search(args))
    _validate(cfg, training=False)
    seed = cfg.hyperparameters.seed if args.seed is None else args.seed
    if args.messages is not None:
        try:
            if args.messages == "-":
                chat = json.load(sys.stdin)
            else:
                with open(args.messages, encoding="utf-8") as handle:
                    chat = json.load(handle)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--messages {args.messages}: {exc}") from exc
        messages, tools = (chat.get("messages"), chat.get("tools")) if isinstance(chat, dict) else (chat, None)
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"--messages {args.messages}: expected a non-empty JSON list of messages, or "
                              '{"messages": [...], "tools": [...]}.')
        from .inference import generate

        message = generate(config=cfg, messages=messages, tools=tools, adapter=args.adapter,
                           max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                           stop=args.stop, seed=seed, tool_syntax=args.tool_syntax)
        print(json.dumps(message, ensure_ascii=False))
        return 0
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ConfigError("no prompt: pass --prompt TEXT or pipe the prompt on standard input.")
        prompt = sys.stdin.read()
    from .inference import generate

    text = generate(prompt, config=cfg, adapter=args.adapter, max_tokens=args.max_tokens,
                    temperature=args.temperature, top_p=args.top_p, stop=args.stop, seed=seed)
    print(text)
    return 0


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} status",
        description="Show a job's state (created, running, completed, failed, cancelled), progress, elapsed time, "
                    "best checkpoint, latest training loss and failure reason, from its status.json.",
    )
    parser.add_argument("job_dir", metavar="JOB_DIR", help="the job's output_dir")
    parser.add_argument("--json", action="store_true", help="print status.json itself (with the metric series)")
    args = parser.parse_args(argv)
    from .training.status import describe_status

    status = _read_job_status(args.job_dir)
    print(json.dumps(status, indent=2) if args.json else describe_status(status, args.job_dir))
    return 0


def _read_job_status(job_dir: str) -> dict:
    """The job's status.json; a missing or unreadable one is a user error (exit 2) naming what is wrong."""
    from .training.status import read_status

    try:
        return read_status(job_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _cancel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} cancel",
        description="Ask a running job to stop after its current step, save a resumable checkpoint and end "
                    "'cancelled' (as SIGTERM does, but with no launcher grace period to beat: torchrun kills its "
                    "workers 30 s after SIGTERM). Running the job's command again resumes it.",
    )
    parser.add_argument("job_dir", metavar="JOB_DIR", help="the job's output_dir")
    args = parser.parse_args(argv)
    from .training.signals import request_cancel
    from .training.status import CREATED, RUNNING, process_alive

    status = _read_job_status(args.job_dir)
    if status["status"] not in (CREATED, RUNNING):
        raise ConfigError(f"{args.job_dir}: the job is {status['status']}; only a created or running job can be "
                          "cancelled")
    if not process_alive(status):
        raise ConfigError(f"{args.job_dir}: the job's process {status.get('pid')} is gone (killed?), so nothing is "
                          "running to cancel; run the job's command again to resume it from its last checkpoint")
    path = request_cancel(Path(args.job_dir).expanduser())
    print(f"cancel requested ({path}): the job stops after its current step, saves a checkpoint and ends "
          "'cancelled'")
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a job's resumable checkpoint (default: its latest) as HF files: adapter/ (HF PEFT) "
                    "and/or model/ (HF checkpoint), at the parallel layout of this run. A checkpoint saved at "
                    "TP=2 exports in one process; under torchrun pass model.tensor_parallel_size=N.",
    )
    parser.add_argument("job_dir", metavar="JOB_DIR", help="the job's output_dir")
    parser.add_argument("--output", default=None, help="where to write (default: JOB_DIR/export-<checkpoint>)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint directory other than the latest")
    parser.add_argument("overrides", nargs="*", help="changes to the job's config, e.g. model.tensor_parallel_size=1")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options
    from .export import export_checkpoint

    try:
        out = export_checkpoint(args.job_dir, args.output, checkpoint=args.checkpoint, overrides=args.overrides)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    print(out)
    return 0


def _evaluate(argv: list[str]) -> int:
    from .evaluation.metrics import METRICS

    parser = argparse.ArgumentParser(
        prog=f"{PROG} evaluate",
        description="Evaluate a model on held-out JSONL rows (prompt/completion or chat, validated like training "
                    "data): task metrics from greedy answers, and loss/perplexity on the completion tokens. "
                    "With --job, the job's model and adapter (or fine-tuned model), written into the job.",
        epilog="metrics: " + "; ".join(f"{m.name} ({m.description})" for m in METRICS.values()),
    )
    parser.add_argument("--data", metavar="FILE", help="held-out JSONL file (with --job default: evaluation.dataset "
                                                       "or the training data's test*.jsonl)")
    parser.add_argument("--adapter", metavar="DIR", help="HF PEFT LoRA adapter directory to evaluate")
    parser.add_argument("--job", metavar="JOB_DIR", help="a customization job's output_dir")
    parser.add_argument("--compare-base", action="store_true", help="also evaluate the base model, side by side")
    parser.add_argument("--metrics", metavar="NAMES", help="comma-separated metric names (default: from the data)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="most tokens per answer (default: the longest "
                                                                    "reference's plus 16)")
    parser.add_argument("--stop", action="append", metavar="S", help="stop string; repeat for several")
    parser.add_argument("--batch-size", type=int, metavar="N", help="rows generated together (16)")
    parser.add_argument("--max-examples", type=int, metavar="N", help="evaluate only the first N rows")
    parser.add_argument("--output", metavar="FILE", help="write the results (metrics and every answer) as JSON")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides selecting the model (model=llama-3.2-1b-instruct "
                             "model.checkpoint=/path), or changes to the job's config with --job (device=cpu)")
    _add_config_search_options(parser)
    args = parser.parse_intermixed_args(argv)
    if args.job is None and args.data is None:
        raise ConfigError("pass --data FILE (the held-out JSONL), or --job JOB_DIR.")
    from .evaluation.evaluate import evaluate_config, job_config

    cfg = job_config(args.job, args.overrides) if args.job else \
        compose_config(args.overrides, search=_config_search(args))
    evaluate_config(cfg, args.data, adapter=args.adapter, job_dir=args.job, compare_base=args.compare_base,
                    metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
                    max_tokens=args.max_tokens, stop=args.stop, batch_size=args.batch_size,
                    max_examples=args.max_examples, output=args.output, progress=cfg.progress_bar)
    return 0


def _serve(argv: list[str]) -> int:
    from .config.schema import ServingConfig

    # `adapters_dir=x` is short for `serving.adapters_dir=x` (unless a top-level key has that name)
    top_level = {f.name for f in dataclasses.fields(Config)}
    fields = [f.name for f in dataclasses.fields(ServingConfig) if f.name not in top_level]
    parser = argparse.ArgumentParser(
        prog=f"{PROG} serve",
        description="Serve a base model and its LoRA adapters over an OpenAI-compatible API (/v1/models, "
                    "/v1/completions, /v1/chat/completions) with continuous batching; needs the [serve] extra. "
                    f"Server settings may be given without their 'serving.' prefix: {', '.join(fields)}.",
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides such as model=smollm2-135m-instruct adapters_dir=outputs/ port=8000 "
                             "(= serving.adapters_dir=..., serving.port=...)")
    _add_config_search_options(parser)
    args = parser.parse_intermixed_args(argv)
    overrides = [f"serving.{item}" if item.split("=", 1)[0] in fields else item for item in args.overrides]
    cfg = compose_config(overrides, search=_config_search(args))
    _validate(cfg, training=False)
    validate_serving(cfg.serving)
    try:
        from .serving import serve
    except ImportError as exc:
        raise ConfigError(f"the server needs FastAPI and uvicorn ({exc}); install them with "
                          "pip install 'nemo_customizer[serve]' (or pip install fastapi uvicorn).") from None
    serve(cfg)
    return 0


def _datasets(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} datasets",
        description="Upload (validate, report, store a copy), list, show and delete datasets; a stored name works "
                    "as dataset.path. Store: --store DIR, else $NEMO_CUSTOMIZER_DATASETS, else "
                    "$NEMO_CUSTOMIZER_CACHE/datasets, else ~/.cache/nemo_customizer/datasets.",
    )
    parser.add_argument("command", choices=_DATASET_COMMANDS, help="what to do (each has --help)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    top = parser.parse_args(argv)
    args = _DATASET_COMMANDS[top.command]().parse_intermixed_args(top.arguments)
    from .data import store  # imported late: the data package pulls in torch

    if top.command == "upload":
        cfg = compose_config([f"model={args.model}", *args.overrides])
        print(store.upload(args.path, args.name, model=cfg.model, store_dir=args.store or cfg.dataset.store_dir,
                           overwrite=args.overwrite, cache_dir=cfg.cache_dir))
    elif top.command == "list":
        rows = store.list_datasets(args.store)
        if not rows:
            print(f"no datasets in {args.store or store.default_store_dir()}")
        _print_table(("name", "format", "training", "validation", "created", "source"),
                     [(d.name, d.format, str(d.training_rows), str(d.validation_rows), d.created, d.source)
                      for d in rows])
    elif top.command == "show":
        print(store.dataset_report(args.name, args.store))
    else:
        print(f"deleted dataset {args.name!r} ({store.delete_dataset(args.name, args.store)})")
    return 0


def _dataset_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} datasets {command}", description=description)
    parser.add_argument("--store", metavar="DIR", help="dataset store directory")
    return parser


def _upload_parser() -> argparse.ArgumentParser:
    parser = _dataset_parser("upload", "Validate every row of a dataset, print a report (formats, rows, token "
                                       "lengths, truncation at max_seq_length) and store a copy as JSON Lines.")
    parser.add_argument("path", metavar="PATH",
                        help="a JSONL, JSON, CSV/TSV, Parquet or Arrow file; a directory of train*/validation* "
                             "files; a `datasets` save_to_disk folder; or a Hub dataset ID org/name[:config] "
                             "(Parquet, Arrow, saved folders and Hub IDs need the [datasets] extra)")
    parser.add_argument("--name", required=True, help="name to store it under (then: dataset.path=NAME)")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                        help=f"model config whose tokenizer and max_seq_length the report uses ({DEFAULT_MODEL})")
    parser.add_argument("--overwrite", action="store_true", help="replace a stored dataset of the same name")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides for the model, such as model.checkpoint=/path model.max_seq_length=4096")
    return parser


def _named_parser(command: str, description: str) -> Callable[[], argparse.ArgumentParser]:
    def build() -> argparse.ArgumentParser:
        parser = _dataset_parser(command, description)
        parser.add_argument("name", metavar="NAME")
        return parser

    return build


_DATASET_COMMANDS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "upload": _upload_parser,
    "list": lambda: _dataset_parser("list", "List the stored datasets."),
    "show": _named_parser("show", "Print a stored dataset's upload report."),
    "delete": _named_parser("delete", "Delete a stored dataset."),
}


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    if not rows:
        return
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _validate(cfg: Config, *, training: bool, warned: set[str] | None = None) -> None:
    """validate_config, with its warnings printed as short ``warning:`` lines (each once, given ``warned``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_config(cfg, training=training)
    for warning in caught:
        line = f"warning: {warning.message}"
        if warned is None or line not in warned:
            print(line, file=sys.stderr)
        if warned is not None:
            warned.add(line)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _human(count: int | None) -> str:
    if count is None:
        return "from checkpoint"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


@dataclasses.dataclass(frozen=True)
class _Command:
    run: Callable[[list[str]], int]
    summary: str
    """One line for the top-level --help."""


_COMMANDS: dict[str, _Command] = {
    "train": _Command(_train, "fine-tune (the default: 'train' may be left out before the overrides)"),
    "configs": _Command(_configs, "list the model configs: the shipped ones and those in --config-dir folders"),
    "generate": _Command(_generate, "complete a prompt or answer a chat, optionally with a trained adapter"),
    "evaluate": _Command(_evaluate, "task metrics and loss on held-out rows, for a job, an adapter or a base model"),
    "serve": _Command(_serve, "an OpenAI-compatible server for a base model and its adapters"),
    "datasets": _Command(_datasets, "upload (validate and store), list, show and delete datasets"),
    "status": _Command(_status, "a job's state and progress (its status.json)"),
    "cancel": _Command(_cancel, "stop a running job after its step, with a checkpoint"),
    "export": _Command(_export, "a job's checkpoint as HF adapter/model files"),
}
