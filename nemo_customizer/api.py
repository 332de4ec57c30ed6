"""``customize()``: config → data → model → LoRA → train → export, top to bottom."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from nemo_customizer.config import Config, check_batch_layout, config_from_kwargs, validate_config
from nemo_customizer.config.validate import check_parallel_layout
from nemo_customizer.jobs import JobDirectory, check_output_dir, peak_memory_gib, with_recorded_checkpoint_revision
from nemo_customizer.training.signals import CANCEL_FILE, StopSignals
from nemo_customizer.training.status import CANCELLED, COMPLETED, JobCancelled, JobStatus
from nemo_customizer.training.trackers import JobTrackers

__all__ = ["CustomizationResult", "JobCancelled", "check_before_work", "customize", "generate", "run"]


@dataclasses.dataclass(frozen=True)
class CustomizationResult:
    """What a finished job produced."""

    job_dir: str
    adapter_path: str
    """The HF PEFT adapter (``lora``, ``lora_merged``); empty for ``all_weights``."""
    model_path: str
    """The exported HF model folder (``lora_merged``, ``all_weights``); empty for ``lora``."""
    metrics_path: str
    # The training fields below come from ``training.state.LoopState.result_fields()``.
    best_epoch: Optional[int]
    best_step: Optional[int]
    best_val_loss: float
    final_train_loss: float
    final_val_loss: float
    steps: int
    epochs_completed: int
    stopped_early: bool
    tokens_per_second: float
    train_seconds: float
    peak_memory_gib: float
    """Peak GPU allocation (CPU jobs: resident memory) of the process that used the most, in GiB."""
    trainable_parameters: int
    total_parameters: int
    warnings: tuple = ()
    status: str = COMPLETED
    """``completed``, or ``cancelled`` for the partial result a ``JobCancelled`` carries."""
    evaluation: Optional[dict] = None
    """Held-out metrics when ``evaluation`` is on: ``{"base": {...}, "customized": {...}}`` (the best checkpoint);
    every answer is in ``<job_dir>/evaluation.json``."""


def customize(
    config: str = "smollm2-135m-instruct",
    dataset: Optional[str | Mapping[str, Any]] = None,
    hyperparameters: Optional[Mapping[str, Any]] = None,
    output_dir: Optional[str] = None,
    num_gpus: Optional[int] = None,
    **overrides: Any,
) -> CustomizationResult:
    """Fine-tune model config ``config`` on ``dataset`` and export the result.

    ``config`` is a model config's name, or the path of a job file of one's own (``"my_job.yaml"``: a YAML whose
    defaults list selects the model, ``defaults: [{model: llama-3.2-1b-instruct}, _self_]``, and sets any other
    key; composed as ``python -m nemo_customizer --config-path DIR --config-name my_job`` composes it, with this
    call's other arguments as overrides on top).

    ``dataset`` is a data file (JSONL, JSON, CSV, Parquet, Arrow), a directory with training/validation files, a
    ``save_to_disk`` folder, a Hub dataset ID, or the name of a dataset stored with ``nemo_customizer.datasets.upload``;
    or a dict of ``dataset`` fields (``{"path": ..., "columns": {"prompt": "question"}}``, ``{"mix": [...]}``).

    ``hyperparameters`` uses NeMo Customizer's names (``epochs``, ``batch_size``, ``learning_rate``,
    ``lora={"adapter_dim": 16}``, ...); other keyword arguments override config sections
    (``model={"checkpoint": "/ckpt"}``, ``device="cpu"``). Unknown keys raise ``ConfigError``.

    ``num_gpus=N`` (N > 1) starts N worker processes on this machine itself, one per GPU (or, with
    ``device="cpu"``, N gloo processes), as ``torchrun --nproc-per-node N`` would; the parallel layout comes from
    ``model={"tensor_parallel_size": ..., "pipeline_parallel_size": ...}`` and the rest is data parallel. Under a
    launcher (``WORLD_SIZE`` set) it is ignored. The workers are spawned interpreters that import the caller's
    ``__main__``: in a script, call ``customize`` under ``if __name__ == "__main__":``.

    SIGTERM or SIGINT (Ctrl-C) during the job finishes the current step, saves, marks the job ``cancelled`` and
    raises ``JobCancelled`` (its ``result`` is the partial result). Progress is in ``<output_dir>/status.json``.
    """
    cfg = config_from_kwargs(config=config, dataset=dataset, hyperparameters=hyperparameters,
                             output_dir=output_dir, **overrides)
    if num_gpus is not None and num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        return _run_spawned(cfg, num_gpus)
    return run(cfg)


def _run_spawned(cfg: Config, workers: int) -> CustomizationResult:
    """``run(cfg)`` in ``workers`` local processes; what can be checked here is checked before any is started."""
    from nemo_customizer.config import ConfigError
    from nemo_customizer.distributed.launch import run_local_workers
    from nemo_customizer.distributed.parallel import resolve_device

    _check_before_work(cfg, world_size=workers, local_world_size=workers, is_main=True)
    if resolve_device(cfg.device).type == "cuda":
        import torch

        if torch.cuda.device_count() < workers:
            raise ConfigError(f"num_gpus={workers} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                              "lower num_gpus (or use device='cpu' for CPU processes).")
    return run_local_workers(run, workers, cfg)


def run(cfg: Config) -> CustomizationResult:
    """Run one customization job described by a composed config."""
    is_main = int(os.environ.get("RANK", "0")) == 0  # the launcher's rank; torch.distributed is not up yet
    check_before_work(cfg)
    log = _Log(enabled=is_main)
    cfg = with_recorded_checkpoint_revision(cfg)  # a resumed job keeps the Hub commit it started from
    inputs = _load_inputs(cfg, log)  # every user-input error surfaces here, before a model exists
    cfg = inputs.cfg
    job = JobDirectory.create(cfg.output_dir, cfg, is_main=is_main)
    status = JobStatus(job if is_main else None, write_every=cfg.log_interval)  # status.json: created
    # From here on an exception marks the job failed (cancelled for JobCancelled / KeyboardInterrupt), and a stop
    # signal during model loading already counts. The W&B / MLflow runs (logger.*) end with the job's outcome.
    with status.tracking(), StopSignals(job.path / CANCEL_FILE if is_main else None) as stop, \
            JobTrackers.open(cfg, job if is_main else None, log) as trackers:
        # One process evaluates the base before training; in a multi-process job the main rank does it after.
        single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
        base = _evaluate_base(cfg, inputs, status, log) if single_process else None
        loop, trainable, layout, peak_gib = _train(cfg, inputs, job, log, status, stop, trackers)
        kind = cfg.hyperparameters.finetuning_type
        evaluation = None
        if inputs.evaluation is not None and layout.is_main and loop.stop_signal is None:
            evaluation = _evaluate_customized(cfg, inputs, job, status, base, log)
        result = CustomizationResult(
            job_dir=str(job.path), metrics_path=str(job.metrics_path),
            adapter_path=str(job.adapter_path) if kind != "all_weights" else "",
            model_path=str(job.model_path) if kind != "lora" else "",
            **loop.result_fields(), peak_memory_gib=peak_gib,
            trainable_parameters=trainable.trainable_parameters, total_parameters=trainable.total_parameters,
            warnings=inputs.warnings, status=COMPLETED if loop.stop_signal is None else CANCELLED,
            evaluation=evaluation,
        )
        if loop.stop_signal is not None:
            raise JobCancelled(loop.stop_signal, loop.steps, result, loop.stop_reason)
        if layout.is_main:
            job.write_result(result)
            log(f"done: {result.steps} steps in {result.train_seconds:.0f}s, {result.tokens_per_second:,.0f} "
                f"tokens/s, best val_loss {result.best_val_loss:.4f} (step {result.best_step}); "
                f"saved: {result.adapter_path or result.model_path}")
        status.completed()
    return result


def check_before_work(cfg: Config) -> None:
    """What ``run(cfg)`` checks first, in this process under its launcher (torchrun says how many processes there
    are): every check that needs no data and no model. A sweep runs it on each job before the first starts."""
    _check_before_work(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                       local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ
                       else None, is_main=int(os.environ.get("RANK", "0")) == 0)


def _check_before_work(cfg: Config, *, world_size: int, local_world_size: Optional[int], is_main: bool) -> None:
    """Every check that needs no data and no model: config values, the parallel layout of ``world_size``
    processes, what the device can run, and (main process) an output_dir the job can write to."""
    import torch

    from nemo_customizer.config import ConfigError
    from nemo_customizer.distributed.parallel import params_dtype, resolve_device

    validate_config(cfg)
    check_parallel_layout(cfg.model, cfg.hyperparameters, world_size, local_world_size)
    if cfg.hyperparameters.use_distributed_optimizer and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("hyperparameters.use_distributed_optimizer=true needs CUDA GPUs (Megatron's distributed "
                          "optimizer shards fp32 state over GPUs); set it to false for a CPU run.")
    if not cfg.hyperparameters.fp32_master_weights and \
            params_dtype(cfg.precision, resolve_device(cfg.device)) != torch.bfloat16:
        raise ConfigError("hyperparameters.fp32_master_weights=false updates bf16 weights in place; set precision=bf16 "
                          "(the default on GPUs) or fp32_master_weights=true.")
    if cfg.model.attention_kernel == "fa4":
        _check_flash_attn4(cfg)
    if cfg.precision == "fp8":
        from nemo_customizer.models.fp8_linear import fp8_unavailable_reason

        why = fp8_unavailable_reason(resolve_device(cfg.device))
        if why:
            raise ConfigError(f"precision=fp8 cannot run: {why}. Set precision=bf16 (the default on GPUs), or run "
                              "on a Hopper GPU.")
    if cfg.hyperparameters.cuda_graphs:
        device = resolve_device(cfg.device)
        if device.type != "cuda":
            raise ConfigError("hyperparameters.cuda_graphs=true needs a CUDA device; set it to false for a CPU run.")
        if params_dtype(cfg.precision, device) == torch.float32:
            raise ConfigError("hyperparameters.cuda_graphs=true needs precision bf16 (packed fp32 attention reads "
                              "sequence boundaries on the host, which a graph cannot replay); set precision=bf16.")
    if is_main:  # an unusable output_dir fails now, not after the data is read and tokenized
        check_output_dir(cfg.output_dir, cfg)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    cfg: Config
    """The config with the checkpoint's architecture merged in."""
    resolved: Any
    tokenizer: Any
    train: list
    val: list
    pack: bool = False
    """Train on packed sequences (asked for, and the model supports it)."""
    warnings: tuple = ()
    evaluation: Any = None
    """The checked held-out evaluation (``evaluation.evaluate.PreparedEvaluation``) when it is on."""


def _check_flash_attn4(cfg: Config) -> None:
    """``model.attention_kernel=fa4`` asks for FlashAttention-4: refused now where it cannot run."""
    import torch

    from nemo_customizer.config import ConfigError
    from nemo_customizer.distributed.parallel import params_dtype, resolve_device
    from nemo_customizer.models.flash_attn4 import takes_head_dim, unavailable_reason
    from nemo_customizer.models.llama import head_dim as head_dim_of

    device = resolve_device(cfg.device)
    head_dim = head_dim_of(cfg.model.architecture)
    why = unavailable_reason(device)
    if not why and params_dtype(cfg.precision, device) == torch.float32:
        why = "it runs bf16/fp16 attention and precision is fp32"
    if not why and not cfg.model.architecture_from_checkpoint and not takes_head_dim(head_dim):
        why = f"its kernels take head sizes 8-256 in steps of 8, and this model's is {head_dim}"
    if why:
        raise ConfigError(f"model.attention_kernel=fa4 cannot run: {why}. Set model.attention_kernel=auto or torch.")


def _load_inputs(cfg: Config, log: "_Log") -> _Inputs:
    """Resolve the checkpoint, read and validate every dataset row, tokenize (no megatron, no process group)."""
    from nemo_customizer.checkpoints.resolve import load_tokenizer, resolve_model
    from nemo_customizer.config.families import check_lora_targets, lora_targets
    from nemo_customizer.config.validate import check_softcapped_attention
    from nemo_customizer.data import DatasetError, load_mixture, tokenize_examples
    from nemo_customizer.data.from_config import dataset_name, dataset_sources

    hp = cfg.hyperparameters
    sources = dataset_sources(cfg.dataset)  # paths, stored dataset names or Hub IDs; one, or dataset.mix's
    resolved = resolve_model(cfg.model, cfg.cache_dir)
    cfg = dataclasses.replace(cfg, model=resolved.config)
    arch = cfg.model.architecture  # model=hf: the family is known only now; its LoRA names too
    check_lora_targets(hp.lora.target_modules, arch.architectures, arch.model_type)
    check_softcapped_attention(cfg.model, hp)
    # An unset target list becomes the family's default here, so the job's resolved config names what trains.
    hp = dataclasses.replace(hp, lora=dataclasses.replace(hp.lora, target_modules=lora_targets(
        hp.lora.target_modules, arch.architectures, arch.model_type)))
    cfg = dataclasses.replace(cfg, hyperparameters=hp)
    tokenizer = load_tokenizer(resolved.tokenizer_dir, cfg.model.chat_template)
    splits = load_mixture(sources, cfg.dataset.val_fraction, hp.seed, max_val_examples=cfg.dataset.max_val_examples)
    train, train_stats = tokenize_examples(splits.train, tokenizer, cfg.model.max_seq_length)
    val, val_stats = tokenize_examples(splits.val, tokenizer, cfg.model.max_seq_length)
    _check_training_type_fits(train + val, cfg)
    _check_token_ids_fit(train + val, tokenizer, cfg)
    if len(train) < hp.batch_size:
        raise DatasetError(f"{dataset_name(cfg.dataset)}: {len(train)} usable training rows is fewer than "
                           f"hyperparameters.batch_size={hp.batch_size}; add data or lower the batch size.")
    log(splits.describe())
    log(f"tokenized with max_seq_length={cfg.model.max_seq_length}: training {train_stats.describe()}; "
        f"validation {val_stats.describe()}")
    for origin in (train_stats.dropped_origins + val_stats.dropped_origins)[:5]:
        log(f"  dropped (no trainable token fits in max_seq_length): {origin}")
    evaluation = _prepare_evaluation(cfg, sources[0].path if len(sources) == 1 else None)
    pack, warnings = hp.sequence_packing_enabled, ()
    if pack and not cfg.model.sequence_packing_supported:  # train anyway, unpacked, and say so
        pack, warnings = False, (f"model {cfg.model.name} does not support sequence packing; "
                                 "hyperparameters.sequence_packing_enabled is ignored and training runs unpacked"
                                 + (" (and without CUDA graphs)" if hp.cuda_graphs else ""),)
        log(f"warning: {warnings[0]}")
    return _Inputs(cfg, resolved, tokenizer, train, val, pack, warnings, evaluation)


def _prepare_evaluation(cfg: Config, dataset_path):
    """The held-out evaluation, read and checked now (bad rows or metrics fail before any model is built); None
    when ``evaluation`` is off."""
    if not (cfg.evaluation.enabled or cfg.evaluation.dataset):
        return None
    from nemo_customizer.evaluation.evaluate import prepare_evaluation, resolve_heldout_path

    path = resolve_heldout_path(cfg.evaluation.dataset, None if dataset_path is None else str(dataset_path))
    return prepare_evaluation(cfg, path, progress=cfg.progress_bar)


def _evaluate_base(cfg: Config, inputs: _Inputs, status: JobStatus, log: "_Log"):
    """The base model on the held-out rows (``evaluation.compare_base``), recorded in status.json at once."""
    if inputs.evaluation is None or not cfg.evaluation.compare_base:
        return None
    from nemo_customizer.evaluation.evaluate import evaluate_model

    base = evaluate_model(cfg, inputs.evaluation, "base", log)
    status.record_evaluation({"base": dict(base.metrics)})
    return base


def _evaluate_customized(cfg: Config, inputs: _Inputs, job: JobDirectory, status: JobStatus, base, log: "_Log"):
    """The best checkpoint's export (adapter, or model for full fine-tuning) on the held-out rows, beside the base;
    written into the job. Returns the metrics summary."""
    from nemo_customizer.evaluation.evaluate import record_in_job, run_evaluation

    full = cfg.hyperparameters.finetuning_type == "all_weights"
    report = run_evaluation(cfg, Path(inputs.evaluation.heldout.path), prepared=inputs.evaluation, base=base,
                            adapter=None if full else str(job.adapter_path),
                            model_dir=job.model_path if full else None,
                            compare_base=cfg.evaluation.compare_base, log=log)
    status.record_evaluation(report.summary())
    record_in_job(job.path, report, update_status=False)
    return report.summary()


def _check_training_type_fits(items: list, cfg: Config) -> None:
    """Preference pairs train with ``training_type: dpo`` and only it."""
    from nemo_customizer.data import DatasetError, TokenizedPair
    from nemo_customizer.data.from_config import dataset_name

    if not items:
        return
    pairs, dpo = isinstance(items[0], TokenizedPair), cfg.hyperparameters.training_type == "dpo"
    if pairs and not dpo:
        raise DatasetError(f"{dataset_name(cfg.dataset)}: the rows are preference pairs (chosen and rejected "
                           "responses), which train with hyperparameters.training_type=dpo; set it, or use "
                           "prompt/completion or chat rows.")
    if dpo and not pairs:
        raise DatasetError(f"{dataset_name(cfg.dataset)}: hyperparameters.training_type=dpo trains on preference "
                           "pairs (rows with a prompt, a chosen and a rejected response), but these rows have one "
                           "answer each; use preference rows, or training_type=sft.")


def _sequences(items: list) -> list:
    """The token sequences of training items: examples, or both sequences of each preference pair."""
    from nemo_customizer.data import TokenizedPair

    return [s for item in items for s in ((item.chosen, item.rejected) if isinstance(item, TokenizedPair) else (item,))]


def _check_token_ids_fit(examples: list, tokenizer: Any, cfg: Config) -> None:
    """Every token id must be a row of the model's embedding: a larger one (a tokenizer with added tokens the
    checkpoint never had) would fail as a device-side assert mid-step on a GPU, or be read as garbage by a kernel."""
    from nemo_customizer.config import ConfigError

    vocab_size = cfg.model.architecture.vocab_size
    largest = max((max(e.input_ids) for e in _sequences(examples) if e.input_ids), default=-1)
    if largest >= vocab_size:
        raise ConfigError(f"the tokenizer ({cfg.model.tokenizer or cfg.model.name}, {len(tokenizer)} tokens) produced "
                          f"token id {largest}, but model {cfg.model.name} has vocab_size {vocab_size}: use the "
                          "tokenizer the checkpoint was trained with, or a checkpoint whose embedding covers it.")


def _train(cfg: Config, inputs: _Inputs, job: JobDirectory, log: "_Log", status: JobStatus, stop: StopSignals,
           trackers: JobTrackers):
    """Build the job's training session (parallel state, model + LoRA, DDP, optimizer, schedule), train; returns
    (loop state, trainable summary, layout, peak memory in GiB of the process that used the most)."""
    from nemo_customizer.distributed.collectives import all_reduce_max
    from nemo_customizer.training.finetuning import best_checkpoint_saver
    from nemo_customizer.training.loop import TrainingJob, fit, planned_steps
    from nemo_customizer.training.metrics import MetricsLog, ProgressBar
    from nemo_customizer.training.objective import TOKEN_MEAN
    from nemo_customizer.training.plots import JobPlots
    from nemo_customizer.training.session import TrainingSession

    hp = cfg.hyperparameters
    pad_id = _pad_id(inputs.tokenizer)
    dpo = hp.training_type == "dpo"
    with TrainingSession(cfg, checkpoint_dir=inputs.resolved.checkpoint_dir) as session:
        layout = session.layout
        plots = JobPlots(job if layout.is_main else None, status.series_points, log)  # loss.png, TensorBoard
        metrics = MetricsLog(job.metrics_path if layout.is_main else None,
                             listeners=(status.record, plots.record, trackers.record) if layout.is_main else ())
        try:
            check_batch_layout(hp.batch_size, hp.micro_batch_size, layout.data_parallel_size)
            pad_multiple = layout.tensor_parallel_size if cfg.model.use_sequence_parallel else 1
            packing = _packing_plan(cfg, inputs.train, layout.data_parallel_size, pad_multiple, log, metrics) \
                if inputs.pack else None
            session.build_model()
            log(f"model {cfg.model.name} on {session.device.type} ({session.params_dtype}), "
                f"TP={layout.tensor_parallel_size} PP={layout.pipeline_parallel_size} DP={layout.data_parallel_size}; "
                f"{session.trainable}")
            total_steps = planned_steps(len(inputs.train), hp, packing)
            session.build_training(total_steps, packed=packing is not None, pad_id=pad_id)
            if session.graphs is not None:
                log("CUDA graphs: each packed micro-batch shape runs eagerly once, then is captured and replayed")
            unit = "pairs" if dpo else "examples"
            batches = (f"batch_size={packing.global_batch_size} bins (packed from {hp.batch_size} {unit}), "
                       f"micro_batch_size={packing.micro_batch_size} bins" if packing else
                       f"batch_size={hp.batch_size} {unit}, micro_batch_size={hp.micro_batch_size}")
            log(f"training {total_steps} steps: epochs={hp.epochs}, {batches}, learning_rate={hp.learning_rate}")
            progress = ProgressBar(total_steps, enabled=layout.is_main and cfg.progress_bar, stream=sys.stderr,
                                   every=cfg.log_interval, log=layout.is_main)
            save_checkpoint, resume = _checkpoints(cfg, job, session, metrics, log)
            train, val, objective = inputs.train, inputs.val, TOKEN_MEAN
            if dpo:
                train, val, objective = _preference_inputs(cfg, inputs, job, session, resumed=resume is not None,
                                                           pad_id=pad_id, pad_multiple=pad_multiple, log=log)
            fit_result = fit(TrainingJob(
                model=session.wrapped, optimizer=session.optimizer, scheduler=session.scheduler,
                train_examples=train, val_examples=val, hyperparameters=hp, layout=layout, objective=objective,
                pad_id=pad_id, pad_to_multiple_of=pad_multiple, metrics=metrics, progress=progress, packing=packing,
                status=status, stop=stop, save_checkpoint=save_checkpoint, resume=resume, graphs=session.graphs,
                save_best=best_checkpoint_saver(session.model, cfg, job, source_dir=inputs.resolved.checkpoint_dir,
                                                tokenizer=inputs.tokenizer),
            ))
            # The busiest process's peak: pipeline stages and rank 0 (which writes the exports) differ.
            (peak_gib,) = all_reduce_max([peak_memory_gib(session.device.type)])
            if session.graphs is not None:
                shapes = session.graphs.captured_shapes
                log(f"CUDA graphs: {len(shapes)} micro-batch shape(s) captured: "
                    + ", ".join(f"{shape.tokens} tokens/{shape.segments} segments/{shape.loss_positions} loss "
                                f"positions" for shape in shapes))
        finally:
            metrics.close()
            plots.close()
    return fit_result, session.trainable, layout, peak_gib


def _preference_inputs(cfg: Config, inputs: _Inputs, job: JobDirectory, session, *, resumed: bool, pad_id: int,
                       pad_multiple: int, log: "_Log"):
    """``training_type: dpo``: the pairs with their reference log-probabilities (computed once, or read back from
    the job directory on resume) and the preference loss."""
    from nemo_customizer.training.preference import PreferenceLoss, scored_pairs

    hp = cfg.hyperparameters
    train, val = scored_pairs(session.wrapped, inputs.train, inputs.val, job_dir=job.path, resumed=resumed,
                              all_weights=hp.finetuning_type == "all_weights", batch_size=hp.batch_size,
                              micro_batch_size=hp.micro_batch_size, layout=session.layout, pad_id=pad_id,
                              pad_to_multiple_of=pad_multiple, log=log)
    dpo = hp.dpo
    log(f"DPO: beta (ref_policy_kl_penalty) {dpo.ref_policy_kl_penalty}, preference_loss_weight "
        f"{dpo.preference_loss_weight}, sft_loss_weight {dpo.sft_loss_weight}, log-probabilities "
        f"{'averaged' if dpo.preference_average_log_probs else 'summed'} per response")
    return train, val, PreferenceLoss(dpo)


def _checkpoints(cfg: Config, job: JobDirectory, session, metrics, log):
    """The resumable-checkpoint callback (None when ``checkpoint.enabled`` is false) and, when the job directory
    holds a checkpoint, the position restored from it (weights, optimizer, schedule and RNG are loaded here into
    ``session``'s model, optimizer and scheduler)."""
    from nemo_customizer.training.checkpointing import Checkpointer

    hp = cfg.hyperparameters
    checkpointer = Checkpointer(job.checkpoints_path, session.model, session.optimizer, session.scheduler,
                                session.layout, distributed_optimizer=hp.use_distributed_optimizer,
                                keep_last=cfg.checkpoint.keep_last)
    latest = job.latest_checkpoint()
    resume = None
    if latest is not None:
        log(f"resuming from {latest}")
        resume = checkpointer.load(latest)
    metrics.rewind(resume.steps if resume else 0)  # records after the checkpoint are trained (and logged) again
    return (checkpointer.save if cfg.checkpoint.enabled else None), resume


def _packing_plan(cfg: Config, train: list, dp_size: int, pad_multiple: int, log: "_Log", metrics):
    """Pack the training examples; state the packing factor, batch sizes, steps and padding in the job log."""
    from nemo_customizer.data.packing import plan_packing, plan_pair_packing

    hp = cfg.hyperparameters
    plan = (plan_pair_packing if hp.training_type == "dpo" else plan_packing)(
        train, max_seq_length=cfg.model.max_seq_length, batch_size=hp.batch_size,
        micro_batch_size=hp.micro_batch_size, dp_size=dp_size, seed=hp.seed, pad_to_multiple_of=pad_multiple)
    if plan.steps_per_epoch == 0:
        from nemo_customizer.data import DatasetError
        from nemo_customizer.data.from_config import dataset_name

        raise DatasetError(f"{dataset_name(cfg.dataset)}: {len(train)} training rows pack into {len(plan.bins)} "
                           f"bins, fewer than one packed batch of {plan.global_batch_size} bins; add data or disable "
                           "packing.")
    log(plan.describe())
    metrics.write(event="packing", packing_factor=plan.packing_factor, bins=len(plan.bins),
                  bin_capacity=plan.bin_capacity, batch_size=plan.global_batch_size,
                  micro_batch_size=plan.micro_batch_size, steps_per_epoch=plan.steps_per_epoch,
                  requested_steps_per_epoch=plan.requested_steps_per_epoch, tokens_per_step=plan.tokens_per_step,
                  requested_tokens_per_step=plan.requested_tokens_per_step, padding_before=plan.padding_before,
                  padding_after=plan.padding_after)
    return plan


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class _Log:
    """Job log lines on stderr, from the main rank only."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


def generate(prompt: Optional[str] = None, *, messages: Optional[list] = None, tools: Optional[list] = None,
             config: str = "smollm2-135m-instruct", adapter: Optional[str] = None, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Optional[list] = None, seed: int = 0,
             tool_syntax: Optional[str] = None, **overrides: Any) -> Any:
    """Complete ``prompt`` and return the text, or answer chat ``messages`` (OpenAI format, optionally offering
    ``tools``) and return the assistant message ``{"role": "assistant", "content": ..., "tool_calls": [...]}``,
    with model config ``config`` (plus an optional LoRA adapter directory).

    Chat renders with the model's chat template; tool calls are parsed for Hermes ``<tool_call>`` and Llama 3 JSON
    templates (``tool_syntax`` overrides the detection). Loads the model for this one call; for many requests,
    finish reasons and token counts use ``nemo_customizer.inference.Generator`` (``complete`` / ``chat``).
    """
    from nemo_customizer.inference import generate as generate_with_config

    cfg = config_from_kwargs(config=config, **overrides)
    if messages is not None or tools is not None:
        return generate_with_config(prompt, config=cfg, messages=messages, tools=tools, adapter=adapter,
                                    max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                    seed=seed, tool_syntax=tool_syntax)
    return generate_with_config(prompt, config=cfg, adapter=adapter, max_tokens=max_tokens, temperature=temperature,
                                top_p=top_p, stop=stop, seed=seed)
