"""Value checks on a composed :class:`Config`, run before any heavy import or GPU work.

Each check raises :class:`ConfigError` with one sentence that names the key and says what to do. Checks that need
the world size (data-parallel divisibility) live in :func:`check_batch_layout`, which the training code calls once it
knows the size. Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings

from .errors import ConfigError, ConfigWarning
from .families import ARCHITECTURES, Family, check_lora_targets, family_of, lora_target_names, window_families
from .schema import (ATTENTION_KERNELS, MISSING_PATH, RECOMPUTE_MODULES, ArchitectureConfig, ColumnsConfig, Config,
                     DatasetConfig, DpoConfig, HyperparametersConfig, LoggerConfig, ModelConfig, ServingConfig)

# Every family's HF projection names, for a model whose family is known only once its config.json is read.
HF_TARGET_MODULES = tuple(dict.fromkeys(name for family in ARCHITECTURES.values() for name in lora_target_names(family)))
MEGATRON_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TRAINING_TYPES = ("sft", "dpo")
FINETUNING_TYPES = ("lora", "lora_merged", "all_weights")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp8")
RECOMMENDED_BATCH_MULTIPLE = 16
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
WANDB_MODES = ("online", "offline")
TRACKERS = ("wandb", "mlflow")
"""``logger.<name>``: each imports the module ``<name>``, installed by the extra ``nemo_customizer[<name>]``."""


def validate_config(cfg: Config, *, training: bool = True) -> None:
    """Check every value of ``cfg``; ``training=False`` (inference) skips the dataset and hyperparameters."""
    _one_of("device", cfg.device, DEVICES)
    _one_of("precision", cfg.precision, PRECISIONS)
    _at_least("log_interval", cfg.log_interval, 1)
    validate_model(cfg.model)
    if not training:
        return
    validate_dataset(cfg.dataset)
    if not 0.0 <= cfg.dataset.val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction must be in [0, 1), got {cfg.dataset.val_fraction}.")
    if cfg.dataset.max_val_examples is not None:
        _at_least("dataset.max_val_examples", cfg.dataset.max_val_examples, 1)
    validate_hyperparameters(cfg.hyperparameters, cfg.model)
    if cfg.precision == "fp8":
        check_fp8_training(cfg.hyperparameters)
    if cfg.hyperparameters.training_type == "dpo" and cfg.evaluation.enabled and not cfg.evaluation.dataset:
        raise ConfigError("evaluation.enabled=true with hyperparameters.training_type=dpo needs evaluation.dataset: "
                          "a held-out file of prompt/completion or chat rows to generate answers for (the "
                          "preference pairs have no single reference answer); set it, or evaluation.enabled=false.")
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    validate_logger(cfg.logger)


def check_fp8_training(hp: HyperparametersConfig) -> None:
    """``precision=fp8`` holds the frozen base in FP8: a LoRA job only, exported as an adapter (the device it needs is
    checked in ``api.check_before_work``)."""
    if hp.finetuning_type == "all_weights":
        raise ConfigError("precision=fp8 stores the frozen base weights in FP8 and trains LoRA adapters only; "
                          "hyperparameters.finetuning_type=all_weights trains every weight: set precision=bf16 "
                          "for full fine-tuning, or finetuning_type=lora.")
    if hp.finetuning_type == "lora_merged":
        raise ConfigError("precision=fp8 with hyperparameters.finetuning_type=lora_merged would fold the adapter "
                          "into the FP8-rounded base; set finetuning_type=lora, then write the merged model from "
                          "the job's checkpoint in bf16: python -m nemo_customizer export JOB_DIR "
                          "hyperparameters.finetuning_type=lora_merged (or train with precision=bf16).")


def validate_logger(logger: LoggerConfig) -> None:
    """Each tracker turned on has its package installed (checked without importing it) and usable settings."""
    for name in TRACKERS:
        if getattr(logger, name).enabled and importlib.util.find_spec(name) is None:
            raise ConfigError(f"logger.{name}.enabled=true needs the {name} package: pip install "
                              f"'nemo_customizer[{name}]' (or set logger.{name}.enabled=false).")
    wandb, mlflow = logger.wandb, logger.mlflow
    if wandb.enabled:
        if wandb.mode is not None:
            _one_of("logger.wandb.mode", wandb.mode, WANDB_MODES)
        for name in ("project", "entity", "name", "group", "dir"):
            _not_blank(f"logger.wandb.{name}", getattr(wandb, name))
    if mlflow.enabled:
        for name in ("tracking_uri", "experiment_name", "run_name"):
            _not_blank(f"logger.mlflow.{name}", getattr(mlflow, name))


def validate_dataset(dataset: DatasetConfig) -> None:
    """Where the data is: ``path`` or ``mix`` (not both), each entry's path and weight, column names."""
    unset = (MISSING_PATH, "", None)
    _column_names("dataset.columns", dataset.columns)
    if not dataset.mix:
        if dataset.path in unset:
            raise ConfigError("dataset.path is required: pass dataset.path=/path/to/data.jsonl (a data file, a "
                              "directory with training/validation files or a Hub dataset ID), or dataset= in "
                              "customize(); or list several datasets in dataset.mix.")
        return
    if dataset.path not in unset:
        raise ConfigError(f"dataset.path={dataset.path!r} and dataset.mix are both set: list every dataset in "
                          "dataset.mix, or unset it.")
    for key in ("columns", "train_split", "val_split"):
        value = getattr(dataset, key)
        if value is not None and value != ColumnsConfig():
            raise ConfigError(f"dataset.{key} applies to dataset.path; with dataset.mix set {key} on each entry "
                              f"(dataset.mix=[{{path: ..., {key}: ...}}]).")
    for i, entry in enumerate(dataset.mix):
        if entry.path in unset:
            raise ConfigError(f"dataset.mix[{i}].path is required: give every entry a path, e.g. "
                              "dataset.mix=[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}].")
        if not 0 < entry.weight < math.inf:
            raise ConfigError(f"dataset.mix[{i}].weight must be a positive number, got {entry.weight}.")
        _column_names(f"dataset.mix[{i}].columns", entry.columns)


def _column_names(key: str, columns: ColumnsConfig) -> None:
    for field in dataclasses.fields(columns):
        value = getattr(columns, field.name)
        if value is not None and not value.strip():
            raise ConfigError(f"{key}.{field.name} is empty: name the column that holds {field.name}, or unset it.")


def validate_serving(serving: ServingConfig) -> None:
    """The server's settings (``serve``): a usable port, positive limits, a known log level."""
    if not 1 <= serving.port <= 65535:
        raise ConfigError(f"serving.port must be in 1..65535, got {serving.port}.")
    if serving.model_name is not None and ("@" in serving.model_name or not serving.model_name.strip()):
        raise ConfigError(f"serving.model_name={serving.model_name!r} must be non-empty and must not contain '@' "
                          "(it separates the base model from an adapter name).")
    for key in ("max_lora_rank", "max_tokens", "max_choices", "max_batch_size"):
        _at_least(f"serving.{key}", getattr(serving, key), 1)
    _at_least("serving.max_request_bytes", serving.max_request_bytes, 1024)
    _one_of("serving.log_level", serving.log_level, LOG_LEVELS)


def validate_hyperparameters(hp: HyperparametersConfig, model: ModelConfig) -> None:
    """Training settings: types of run, positive sizes and rates, schedule, LoRA, early stopping."""
    _one_of("hyperparameters.training_type", hp.training_type, TRAINING_TYPES)
    _one_of("hyperparameters.finetuning_type", hp.finetuning_type, FINETUNING_TYPES)
    _at_least("hyperparameters.epochs", hp.epochs, 1)
    _at_least("hyperparameters.batch_size", hp.batch_size, 1)
    _at_least("hyperparameters.micro_batch_size", hp.micro_batch_size, 1)
    check_batch_layout(hp.batch_size, hp.micro_batch_size, 1)
    if hp.batch_size % RECOMMENDED_BATCH_MULTIPLE:
        warnings.warn(f"hyperparameters.batch_size={hp.batch_size} is not a multiple of "
                      f"{RECOMMENDED_BATCH_MULTIPLE}; multiples of {RECOMMENDED_BATCH_MULTIPLE} are recommended.",
                      ConfigWarning, stacklevel=2)
    _positive("hyperparameters.learning_rate", hp.learning_rate)
    if not 0.0 <= hp.min_learning_rate <= hp.learning_rate:
        raise ConfigError(f"hyperparameters.min_learning_rate={hp.min_learning_rate} must be between 0 and "
                          f"hyperparameters.learning_rate={hp.learning_rate}.")
    _at_least("hyperparameters.warmup_steps", hp.warmup_steps, 0)
    _non_negative("hyperparameters.weight_decay", hp.weight_decay)
    _non_negative("hyperparameters.clip_grad", hp.clip_grad)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(hp, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"hyperparameters.{name} must be in [0, 1), got {value}.")
    if hp.max_steps is not None:
        _at_least("hyperparameters.max_steps", hp.max_steps, 1)
    if hp.val_check_interval is not None:
        _at_least("hyperparameters.val_check_interval", hp.val_check_interval, 1)
    # sequence_packing_enabled on a model without packing support is not an error: the job trains unpacked and says
    # so in its log and result (api._load_inputs).
    if hp.cuda_graphs and not hp.sequence_packing_enabled:
        raise ConfigError("hyperparameters.cuda_graphs=true replays packed micro batches (fixed shapes); set "
                          "hyperparameters.sequence_packing_enabled=true or cuda_graphs=false.")
    unknown = [m for m in hp.recompute_modules if m not in RECOMPUTE_MODULES]
    if unknown:
        raise ConfigError(f"hyperparameters.recompute_modules: {unknown[0]!r} is not one of "
                          f"{', '.join(RECOMPUTE_MODULES)}.")
    if hp.recompute_modules and hp.activation_checkpointing:
        raise ConfigError("hyperparameters.recompute_modules recomputes parts of each layer, activation_checkpointing "
                          "whole layers: set one of them (recompute_modules=[] or activation_checkpointing=false).")
    if hp.recompute_modules and hp.cuda_graphs:
        raise ConfigError("hyperparameters.cuda_graphs=true and recompute_modules cannot be combined (recomputation "
                          "replays forward code inside the captured backward); set recompute_modules=[] or "
                          "cuda_graphs=false.")
    if hp.cuda_graphs and hp.activation_checkpointing:
        raise ConfigError("hyperparameters.cuda_graphs=true and activation_checkpointing=true cannot be combined "
                          "(recomputation saves and restores RNG state, which a graph capture refuses); set one to "
                          "false.")
    # Pipeline stages exchange activations in their own schedule, outside one micro batch's graph. Tensor (and
    # sequence) parallelism is captured with its collectives; data parallelism reduces outside the graph.
    if hp.cuda_graphs and model.pipeline_parallel_size > 1:
        raise ConfigError(f"hyperparameters.cuda_graphs=true runs with model.pipeline_parallel_size=1 only (got "
                          f"{model.pipeline_parallel_size}); set cuda_graphs=false for this layout.")
    if not hp.fp32_master_weights and hp.use_distributed_optimizer:
        raise ConfigError("hyperparameters.fp32_master_weights=false keeps no fp32 state for the distributed "
                          "optimizer to shard; set use_distributed_optimizer=false or fp32_master_weights=true.")
    _validate_lora(hp, model)
    _validate_dpo(hp)
    _at_least("hyperparameters.early_stopping.patience", hp.early_stopping.patience, 1)
    _non_negative("hyperparameters.early_stopping.min_delta", hp.early_stopping.min_delta)


def check_softcapped_attention(model: ModelConfig, hp: HyperparametersConfig) -> None:
    """Softcapped attention (``attn_logit_softcapping``) runs without flash kernels: FlexAttention with a block mask
    built from the sequence boundaries every step on CUDA, per sequence with the boundaries read on the host
    elsewhere (``models.attention``). ``model.attention_kernel=fa4`` (required) cannot serve it, nor can a CUDA
    graph replay it. Checked once the architecture is known (``model=hf``: from config.json)."""
    cap = model.architecture.attn_logit_softcapping
    if cap is None:
        return
    if hp.cuda_graphs:
        raise ConfigError(f"hyperparameters.cuda_graphs=true cannot replay this model's softcapped attention "
                          f"(attn_logit_softcapping={cap}: no flash kernel here softcaps; FlexAttention's block mask "
                          "is built from each step's sequence boundaries); set hyperparameters.cuda_graphs=false.")
    if model.attention_kernel == "fa4":
        raise ConfigError(f"model.attention_kernel=fa4 cannot run this model's softcapped attention "
                          f"(attn_logit_softcapping={cap}: FlashAttention-4 does not softcap in backward); set "
                          "model.attention_kernel=auto.")


def _validate_dpo(hp: HyperparametersConfig) -> None:
    """``hyperparameters.dpo``: read only by ``training_type: dpo``; a positive β and a loss to train on."""
    dpo = hp.dpo
    if hp.training_type != "dpo":
        default = DpoConfig()
        changed = [f.name for f in dataclasses.fields(DpoConfig) if getattr(dpo, f.name) != getattr(default, f.name)]
        if changed:
            raise ConfigError(f"hyperparameters.dpo.{changed[0]} is set but hyperparameters.training_type="
                              f"{hp.training_type!r}; set training_type=dpo (preference pairs) or drop the dpo "
                              "settings.")
        return
    _positive("hyperparameters.dpo.ref_policy_kl_penalty", dpo.ref_policy_kl_penalty)
    _non_negative("hyperparameters.dpo.preference_loss_weight", dpo.preference_loss_weight)
    _non_negative("hyperparameters.dpo.sft_loss_weight", dpo.sft_loss_weight)
    if dpo.preference_loss_weight == 0 and dpo.sft_loss_weight == 0:
        raise ConfigError("hyperparameters.dpo.preference_loss_weight and sft_loss_weight are both 0: nothing would "
                          "train; set preference_loss_weight (1.0 by default) above 0.")
    # The preference loss gives each token a gradient that depends on its whole pair, known only after the forward:
    # a CUDA graph replays a fixed per-token loss (training.graphs).
    if hp.cuda_graphs:
        raise ConfigError("hyperparameters.cuda_graphs=true replays supervised (per-token) losses only; set "
                          "cuda_graphs=false with training_type=dpo.")


def _validate_lora(hp: HyperparametersConfig, model: ModelConfig) -> None:
    lora = hp.lora
    _at_least("hyperparameters.lora.adapter_dim", lora.adapter_dim, 1)
    _positive("hyperparameters.lora.alpha", lora.alpha)
    if not 0.0 <= lora.adapter_dropout < 1.0:
        raise ConfigError(f"hyperparameters.lora.adapter_dropout must be in [0, 1), got {lora.adapter_dropout}.")
    if lora.target_modules is None:  # the family's default (families.lora_targets), valid by construction
        return
    if not lora.target_modules:
        raise ConfigError("hyperparameters.lora.target_modules is empty; list modules such as [q_proj,v_proj], or "
                          "leave it unset for the family's default.")
    known = HF_TARGET_MODULES + MEGATRON_TARGET_MODULES
    for name in lora.target_modules:
        if name not in known:
            raise ConfigError(f"hyperparameters.lora.target_modules has unknown module {name!r}; use HF names "
                              f"({', '.join(HF_TARGET_MODULES)}) or Megatron names "
                              f"({', '.join(MEGATRON_TARGET_MODULES)}).")
    if not model.architecture_from_checkpoint:  # else checked once config.json is read (api._load_inputs)
        check_lora_targets(lora.target_modules, model.architecture.architectures, model.architecture.model_type)


def validate_model(model: ModelConfig) -> None:
    """Model settings: weight source, sequence length, parallelism against the architecture."""
    source, _ = model_source(model)
    _at_least("model.max_seq_length", model.max_seq_length, 1)
    if model.attention_kernel not in ATTENTION_KERNELS:
        raise ConfigError(f"model.attention_kernel={model.attention_kernel!r} is not one of "
                          f"{', '.join(ATTENTION_KERNELS)}.")
    if model.architecture_from_checkpoint:
        if source != "checkpoint":
            raise ConfigError(f"model {model.name} takes its architecture from the checkpoint: pass "
                              "model.checkpoint=/path/to/hf_checkpoint or a Hugging Face Hub model ID (org/name).")
        return  # the architecture checks run once config.json is read (checkpoints/resolve.py)
    arch = model.architecture
    validate_architecture(arch, prefix="model.architecture")
    if model.max_seq_length > arch.max_position_embeddings:
        raise ConfigError(f"model.max_seq_length={model.max_seq_length} exceeds the model's "
                          f"max_position_embeddings={arch.max_position_embeddings}; lower model.max_seq_length.")
    tp = model.tensor_parallel_size
    _at_least("model.tensor_parallel_size", tp, 1)
    _at_least("model.pipeline_parallel_size", model.pipeline_parallel_size, 1)
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(arch, key)
        if heads % tp:
            raise ConfigError(f"model.tensor_parallel_size={tp} does not divide model.architecture.{key}={heads}; "
                              "pick a tensor parallel size that divides both head counts.")
    if arch.num_hidden_layers % model.pipeline_parallel_size:
        raise ConfigError(f"model.pipeline_parallel_size={model.pipeline_parallel_size} does not divide "
                          f"model.architecture.num_hidden_layers={arch.num_hidden_layers}; pick a pipeline parallel "
                          "size that divides the layer count (each stage holds the same number of layers).")
    if model.use_sequence_parallel and tp == 1:
        raise ConfigError("model.use_sequence_parallel=true needs model.tensor_parallel_size > 1; set "
                          "model.use_sequence_parallel=false or raise the tensor parallel size.")


def validate_architecture(arch: ArchitectureConfig, prefix: str = "model.architecture") -> None:
    """A supported family and consistent shapes (also applied to a checkpoint's config.json)."""
    family = family_of(arch.architectures, arch.model_type, source=f"{prefix}.architectures")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings"):
        _at_least(f"{prefix}.{key}", getattr(arch, key), 1)
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise ConfigError(f"{prefix}.num_attention_heads={arch.num_attention_heads} is not divisible by "
                          f"{prefix}.num_key_value_heads={arch.num_key_value_heads}.")
    if arch.head_dim is None and arch.hidden_size % arch.num_attention_heads:
        raise ConfigError(f"{prefix}.hidden_size={arch.hidden_size} is not divisible by num_attention_heads="
                          f"{arch.num_attention_heads}; set {prefix}.head_dim.")
    if arch.head_dim is not None:
        _at_least(f"{prefix}.head_dim", arch.head_dim, 1)
    _positive(f"{prefix}.rope_theta", arch.rope_theta)
    _positive(f"{prefix}.rms_norm_eps", arch.rms_norm_eps)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(arch, key) is not None:
            _positive(f"{prefix}.{key}", getattr(arch, key))
    _validate_windows(arch, family, prefix)
    if arch.rope_scaling is not None:
        _validate_rope_scaling(arch, family, prefix)


def _validate_rope_scaling(arch: ArchitectureConfig, family: Family, prefix: str) -> None:
    """A known rope type; longrope where the family's transformers class reads it, and only there (Phi-3, whose
    class reads no other), with one short and one long factor per rotary frequency."""
    scaling = arch.rope_scaling
    kinds = ("longrope",) if family.module == "phi3" else ("llama3", "linear")
    if scaling.rope_type not in kinds:
        raise ConfigError(f"{prefix}.rope_scaling.rope_type={scaling.rope_type!r} is not supported for "
                          f"{', '.join(arch.architectures)}; use {' or '.join(kinds)}"
                          + (" (longrope: Phi-3 only)." if scaling.rope_type == "longrope" else "."))
    if scaling.rope_type != "longrope":
        return
    _at_least(f"{prefix}.rope_scaling.original_max_position_embeddings", scaling.original_max_position_embeddings, 1)
    frequencies = (arch.head_dim or arch.hidden_size // arch.num_attention_heads) // 2
    for key in ("short_factor", "long_factor"):
        factors = getattr(scaling, key)
        if factors is None or len(factors) != frequencies or not all(f > 0 for f in factors):
            got = "none" if factors is None else f"{len(factors)} numbers"
            raise ConfigError(f"{prefix}.rope_scaling.{key} must list {frequencies} positive numbers (one per rotary "
                              f"frequency, head_dim / 2) for longrope; got {got}. Copy it from the checkpoint's "
                              "config.json, or use model=hf model.checkpoint=/path to read it from there.")
    if scaling.attention_factor is not None:
        _positive(f"{prefix}.rope_scaling.attention_factor", scaling.attention_factor)


LAYER_TYPES = ("sliding_attention", "full_attention")


def _validate_windows(arch: ArchitectureConfig, family: Family, prefix: str) -> None:
    """A positive window, one known layer type per layer; layer types only with a window; and only windows the
    family's transformers class runs, else its export would attend differently from the trained model."""
    if arch.sliding_window is not None:
        _at_least(f"{prefix}.sliding_window", arch.sliding_window, 1)
        if family.windows == "none":
            raise ConfigError(f"{prefix}.sliding_window={arch.sliding_window}: {', '.join(arch.architectures)} has no "
                              "sliding-window attention in transformers, so its export would attend to every key "
                              f"where training did not; set {prefix}.sliding_window to null, or use a family that "
                              f"has one ({window_families()}).")
    if arch.layer_types is None:
        return
    if arch.sliding_window is None:
        raise ConfigError(f"{prefix}.layer_types is set but {prefix}.sliding_window is null; set the window its "
                          "sliding_attention layers use, or drop layer_types.")
    if len(arch.layer_types) != arch.num_hidden_layers or set(arch.layer_types) - set(LAYER_TYPES):
        raise ConfigError(f"{prefix}.layer_types must name one of {', '.join(LAYER_TYPES)} for each of the "
                          f"{arch.num_hidden_layers} layers; got {list(arch.layer_types)}.")
    if family.windows == "every_layer" and len(set(arch.layer_types)) > 1:
        raise ConfigError(f"{prefix}.layer_types mixes windowed and full layers, but {', '.join(arch.architectures)} "
                          "windows every layer alike in transformers; set layer_types to null (every layer uses "
                          f"{prefix}.sliding_window).")


def model_source(model: ModelConfig) -> tuple[str, str | None]:
    """Where the weights come from: ``("checkpoint", dir)``, ``("embedded", name)`` or ``("random", None)``.

    A checkpoint wins over ``embedded`` (a model YAML's default); ``random_weights`` wins over ``embedded`` but
    cannot be combined with a checkpoint.
    """
    if model.checkpoint and model.random_weights:
        raise ConfigError("model.checkpoint and model.random_weights=true are both set; drop one of them.")
    if model.checkpoint:
        return "checkpoint", model.checkpoint
    if model.random_weights:
        return "random", None
    if model.embedded:
        return "embedded", model.embedded
    raise ConfigError(f"model {model.name} has no weights: pass model.checkpoint=/path/to/hf_checkpoint (a folder "
                      "with config.json and *.safetensors) or a Hugging Face Hub model ID (org/name[@revision]), or "
                      "model.random_weights=true for weight-free runs.")


def check_batch_layout(global_batch: int, micro_batch: int, data_parallel_size: int) -> int:
    """Gradient-accumulation steps for ``global_batch = micro_batch × data_parallel_size × steps``.

    Raises ConfigError when the sizes do not divide; used here with ``data_parallel_size=1`` and again by the
    training code once the world size is known.
    """
    if micro_batch < 1 or data_parallel_size < 1:
        raise ConfigError(f"micro batch size ({micro_batch}) and data-parallel size ({data_parallel_size}) must "
                          "be at least 1.")
    per_step = micro_batch * data_parallel_size
    if global_batch < 1 or global_batch % per_step:
        dp = f" × data-parallel size {data_parallel_size} = {per_step}" if data_parallel_size > 1 else ""
        raise ConfigError(f"hyperparameters.batch_size={global_batch} is not a multiple of "
                          f"hyperparameters.micro_batch_size={micro_batch}{dp}; pick a batch size that is a "
                          f"multiple of {per_step}.")
    return global_batch // per_step


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}.")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low}, got {value}.")


def _not_blank(key: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{key} is empty; give a value or leave it unset (null) for the default.")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be greater than 0, got {value}.")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key} must be 0 or more, got {value}.")


def check_parallel_layout(model: ModelConfig, hp: HyperparametersConfig, world_size: int,
                          local_world_size: int | None = None) -> int:
    """The data-parallel size of ``world_size`` processes under the model's TP × PP, or a ConfigError saying what
    to change. Runs before any data is read or process group started (``WORLD_SIZE`` comes from the launcher).
    """
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(f"{world_size} processes cannot be split into model.tensor_parallel_size={tp} × "
                          f"model.pipeline_parallel_size={pp}; launch a multiple of {tp * pp} processes or change "
                          "the parallel sizes.")
    if local_world_size is not None and tp > local_world_size:
        raise ConfigError(f"model.tensor_parallel_size={tp} is larger than the {local_world_size} processes (GPUs) "
                          "on one node; tensor parallelism needs the fast links inside a node, so keep it ≤ the GPUs "
                          "per node and add pipeline or data parallelism across nodes.")
    data_parallel = world_size // (tp * pp)
    check_batch_layout(hp.batch_size, hp.micro_batch_size, data_parallel)
    return data_parallel
