"""``evaluate()``: a model config (plus an adapter, or a job directory) on a held-out JSONL file, base beside
customized, with task metrics. Every input is checked before a model is loaded."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nemo_customizer.config import Config, ConfigError, config_from_file, config_from_kwargs, validate_config
from nemo_customizer.evaluation.heldout import HeldOutSet, read_heldout
from nemo_customizer.evaluation.metrics import check_metrics, default_metrics
from nemo_customizer.evaluation.report import EvaluationReport
from nemo_customizer.evaluation.runner import EvaluationOptions

EVALUATION_FILE = "evaluation.json"
EVALUATION_PLOT = "evaluation.png"
TEST_PREFIXES = ("test",)


def evaluate(dataset: Optional[str] = None, *, config: str = "smollm2-135m-instruct", adapter: Optional[str] = None,
             job_dir: Optional[str] = None, compare_base: bool = False, metrics: Optional[Sequence[str]] = None,
             max_tokens: Optional[int] = None, stop: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
             max_examples: Optional[int] = None, output: Optional[str] = None, progress: bool = True,
             **overrides: Any) -> EvaluationReport:
    """Evaluate model config ``config`` (with LoRA ``adapter``, an HF PEFT folder) on the held-out JSONL ``dataset``.

    ``job_dir`` takes the model, adapter (or fine-tuned model) and evaluation settings from a customization job, the
    held-out file from ``evaluation.dataset`` or the training data's ``test*.jsonl`` when ``dataset`` is not given,
    and writes the results into the job (``evaluation.json``, ``status.json``, ``metrics.jsonl``,
    ``evaluation.png``). ``compare_base`` also evaluates the model without the adapter. ``metrics`` default to
    those that fit the data (``metrics.default_metrics``). Results also go to ``output`` (JSON) when given.
    Other keyword arguments override config sections (``device="cpu"``, ``model={"checkpoint": ...}``).
    """
    from nemo_customizer.config.compose import overrides_from_dict

    if job_dir is not None:
        cfg = job_config(job_dir, overrides_from_dict(overrides))
    else:
        cfg = config_from_kwargs(config=config, **overrides)
    return evaluate_config(cfg, dataset, adapter=adapter, job_dir=job_dir, compare_base=compare_base,
                           metrics=metrics, max_tokens=max_tokens, stop=stop, batch_size=batch_size,
                           max_examples=max_examples, output=output, progress=progress)


def evaluate_config(cfg: Config, dataset: Optional[str] = None, *, adapter: Optional[str] = None,
                    job_dir: Optional[str] = None, compare_base: bool = False,
                    metrics: Optional[Sequence[str]] = None, max_tokens: Optional[int] = None,
                    stop: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                    max_examples: Optional[int] = None, output: Optional[str] = None,
                    progress: bool = True) -> EvaluationReport:
    """``evaluate`` with a composed config (the command line's); with ``job_dir``, ``cfg`` is the job's."""
    validate_config(cfg, training=False)
    model_dir = None
    if job_dir is not None:
        exported_adapter, model_dir = job_exports(job_dir, cfg)
        adapter = adapter or exported_adapter
        dataset = dataset or cfg.evaluation.dataset
    options = dict(metrics=metrics, max_tokens=max_tokens, stop=stop, batch_size=batch_size,
                   max_examples=max_examples)
    settings = dataclasses.replace(cfg.evaluation, **{k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                      for k, v in options.items() if v is not None})
    path = resolve_heldout_path(dataset, _training_data(cfg) if job_dir else None)
    report = run_evaluation(dataclasses.replace(cfg, evaluation=settings), path, adapter=adapter,
                            model_dir=model_dir, compare_base=compare_base, progress=progress, log=_stderr)
    if output:
        _write_json(Path(output), report.to_json())
    if job_dir is not None:
        record_in_job(Path(job_dir), report)
    return report


def resolve_heldout_path(dataset: Optional[str], training_data: Optional[str]) -> Path:
    """``dataset``, else the one ``test*.jsonl`` beside the training files; raises ``ConfigError`` when neither."""
    if dataset:
        return Path(dataset).expanduser()
    if training_data and Path(training_data).is_dir():
        tests = sorted(p for p in Path(training_data).iterdir() if p.suffix.lower() == ".jsonl"
                       and p.name.lower().startswith(TEST_PREFIXES) and not p.is_dir())
        if len(tests) == 1:
            return tests[0]
        if len(tests) > 1:
            raise ConfigError(f"{training_data} holds {len(tests)} test*.jsonl files "
                              f"({', '.join(p.name for p in tests)}); set evaluation.dataset to the one to use.")
    raise ConfigError("no held-out data to evaluate on: set evaluation.dataset (or pass a JSONL file), or put a "
                      "test.jsonl beside the training files.")


@dataclasses.dataclass(frozen=True)
class PreparedEvaluation:
    """The held-out rows and options, checked against each other; no model involved yet."""

    heldout: HeldOutSet
    options: EvaluationOptions


def prepare_evaluation(cfg: Config, path: Path, *, progress: bool = True) -> PreparedEvaluation:
    """Read and validate the held-out file and check the evaluation settings against it (``DatasetError`` /
    ``ConfigError``), before any model is loaded."""
    settings = cfg.evaluation
    for key in ("batch_size", "max_tokens", "max_examples"):
        value = getattr(settings, key)
        if value is not None and value < 1:
            raise ConfigError(f"evaluation.{key}={value}: must be at least 1.")
    heldout = read_heldout(path, settings.max_examples)
    wanted = list(settings.metrics) or list(default_metrics(heldout.format, labels=heldout.labels,
                                                            has_tool_calls=heldout.has_tool_calls))
    try:
        names = check_metrics(wanted, heldout.format, labels=heldout.labels, has_tool_calls=heldout.has_tool_calls,
                              where=f"evaluation.metrics (held-out file {path})")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for always in ("loss", "perplexity"):
        if always not in names:
            names = (*names, always)
    return PreparedEvaluation(heldout, EvaluationOptions(metrics=names, max_tokens=settings.max_tokens,
                                                         stop=tuple(settings.stop), batch_size=settings.batch_size,
                                                         progress=progress))


def run_evaluation(cfg: Config, path: Path, *, adapter: Optional[str] = None, model_dir: Optional[Path] = None,
                   compare_base: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                   prepared: Optional[PreparedEvaluation] = None, base: Any = None) -> EvaluationReport:
    """Evaluate ``cfg.model`` on ``path``: the base model when ``compare_base`` (or when nothing is customized),
    then with ``adapter`` attached, or the fine-tuned HF folder ``model_dir``. ``base`` reuses an earlier
    ``ModelEvaluation`` of the base model (a job's evaluation before training)."""
    prepared = prepared or prepare_evaluation(cfg, path, progress=progress)
    if adapter is not None:
        check_adapter_fits(adapter, _architecture(cfg))
    customized = adapter is not None or model_dir is not None
    base_result = base
    customized_result = None
    if (compare_base or not customized) and base_result is None:
        base_result = evaluate_model(cfg, prepared, "base", log)
    if adapter is not None:
        customized_result = evaluate_model(cfg, prepared, "customized", log, adapter=adapter)
    elif model_dir is not None:
        tuned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=str(model_dir),
                                                                   embedded=None, tokenizer=None))
        customized_result = evaluate_model(tuned, prepared, "customized", log)
    report = EvaluationReport(dataset=str(path), format=prepared.heldout.format, metrics=prepared.options.metrics,
                              rows=len(prepared.heldout.examples), references=list(prepared.heldout.references),
                              base=base_result, customized=customized_result,
                              adapter=str(adapter or model_dir) if customized else None)
    log(report.table())
    return report


def evaluate_model(cfg: Config, prepared: PreparedEvaluation, name: str, log: Callable[[str], None],
                   adapter: Optional[str] = None):
    """One model (``cfg.model`` plus ``adapter``) on the prepared held-out rows: a ``ModelEvaluation`` named
    ``name``."""
    from nemo_customizer.evaluation.heldout import tokenize_heldout
    from nemo_customizer.evaluation.runner import evaluate_generator
    from nemo_customizer.inference import Generator

    with Generator.from_config(cfg, adapter=adapter) as generator:
        tokenized = tokenize_heldout(prepared.heldout, generator.tokenizer, generator.max_context)
        result = evaluate_generator(generator, prepared.heldout, tokenized, prepared.options, name)
    log(f"evaluated the {name} model on {len(tokenized)} held-out rows in {result.seconds:.0f}s")
    return result


def check_adapter_fits(adapter: str, arch) -> None:
    """An adapter trained on another base model is refused before any model is loaded: each LoRA matrix's shape
    must fit this architecture's projection and its layer must exist."""
    from safetensors import safe_open

    from nemo_customizer.models.llama import head_dim
    from nemo_customizer.peft.export import ADAPTER_WEIGHTS, read_lora_config

    try:
        rank = read_lora_config(adapter).adapter_dim
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(f"adapter {adapter}: {exc}") from None
    q, kv = arch.num_attention_heads * head_dim(arch), arch.num_key_value_heads * head_dim(arch)
    hidden, inner = arch.hidden_size, arch.intermediate_size
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden),
            "qkv_proj": (hidden, q + 2 * kv), "gate_up_proj": (hidden, 2 * inner)}  # Phi-3's fused modules
    weights = Path(adapter) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"adapter {adapter}: no {ADAPTER_WEIGHTS}; expected an HF PEFT LoRA adapter directory.")
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            parts = key.split(".")
            layer, projection, matrix = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
            shape = tuple(handle.get_slice(key).get_shape())
            fan_in, fan_out = dims.get(projection, (None, None))
            want = (rank, fan_in) if matrix == "lora_A" else (fan_out, rank)
            if layer >= arch.num_hidden_layers or fan_in is None or shape != want:
                raise ConfigError(
                    f"adapter {adapter} does not fit this base model: {key} has shape {shape}, but the model has "
                    f"{arch.num_hidden_layers} layers and expects {want} there (hidden {hidden}, {arch.num_attention_heads}"
                    f" heads, {arch.num_key_value_heads} kv heads). Evaluate it with the base model it was trained on.")


def _architecture(cfg: Config):
    from nemo_customizer.checkpoints.resolve import resolve_model

    return resolve_model(cfg.model, cfg.cache_dir).config.architecture


def _training_data(cfg: Config) -> Optional[str]:
    """The job's training data path (a stored dataset's name resolved to its folder), or None when it is gone."""
    from nemo_customizer.data.errors import DatasetError
    from nemo_customizer.data.store import resolve_dataset_path

    try:
        return str(resolve_dataset_path(cfg.dataset.path, cfg.dataset.store_dir))
    except (DatasetError, ConfigError, FileNotFoundError):
        return None


def job_config(job_dir: str, overrides: Sequence[str] = ()) -> Config:
    """A customization job's saved config, with ``overrides`` (``device=cpu``) on top."""
    from nemo_customizer.jobs import CONFIG_FILE

    path = Path(job_dir).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{job_dir} is not a job directory ({CONFIG_FILE} is missing).")
    return config_from_file(path, overrides)


def job_exports(job_dir: str, cfg: Config) -> tuple[Optional[str], Optional[Path]]:
    """What a job exported for evaluation: ``(adapter, None)``, or ``(None, model folder)`` for full fine-tuning."""
    from nemo_customizer.jobs import JobDirectory

    job = JobDirectory(Path(job_dir).expanduser().resolve())
    full = cfg.hyperparameters.finetuning_type == "all_weights"
    exported = job.model_path / "config.json" if full else job.adapter_path / "adapter_config.json"
    if not exported.is_file():
        raise ConfigError(f"{job_dir} has no exported {'model' if full else 'adapter'} ({exported.parent}); the job "
                          "has not validated yet (or run `python -m nemo_customizer export` first).")
    return (None, job.model_path) if full else (str(job.adapter_path), None)


def record_in_job(job_path: Path, report: EvaluationReport, *, update_status: bool = True) -> None:
    """The report into a job directory: evaluation.json, status.json's ``evaluation`` (unless the running job's
    ``JobStatus`` records it), an ``evaluation`` record in metrics.jsonl, and evaluation.png (with matplotlib)."""
    import time

    from nemo_customizer.jobs import write_file_atomic
    from nemo_customizer.training.status import STATUS_FILE

    _write_json(job_path / EVALUATION_FILE, report.to_json())
    status_path = job_path / STATUS_FILE
    if update_status and status_path.is_file():
        status = json.loads(status_path.read_text())
        status["evaluation"] = report.summary()
        write_file_atomic(status_path, json.dumps(status, allow_nan=False) + "\n")
    with open(job_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"event": "evaluation", "time": time.time(), "dataset": report.dataset,
                                 **report.summary()}) + "\n")
    png = report.plot_png()
    if png is not None:
        write_file_atomic(job_path / EVALUATION_PLOT, png)


def _write_json(path: Path, data: dict) -> None:
    from nemo_customizer.jobs import write_file_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
