"""Typed configuration schema: the single source of truth for every run.

Hydra YAML (``conf/``) and ``customize(**kwargs)`` only select and override these fields. The dataclasses are
registered as structured configs, so a misspelled key is an error instead of a silent default.
This module must not import torch or megatron: configs are validated before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

MISSING_PATH = "???"


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, in HF ``config.json`` terms: ``llama3`` (Llama-3.1 and later); ``linear`` (every
    frequency divided by ``factor``; Gemma 3's global layers), which reads only ``factor``; or ``longrope`` (Phi-3.5,
    the Phi-3 128k checkpoints: ``models.longrope``), which reads ``short_factor``, ``long_factor``,
    ``original_max_position_embeddings`` and ``attention_factor``."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: Optional[List[float]] = None
    """longrope: per rotary frequency, what it is divided by in a sequence of at most
    ``original_max_position_embeddings`` tokens (head_dim / 2 numbers)."""
    long_factor: Optional[List[float]] = None
    """longrope: the same for a longer sequence."""
    attention_factor: Optional[float] = None
    """longrope: what cos and sin are multiplied by (every attention score by its square), at any length. ``None``:
    transformers' default, ``sqrt(1 + ln(s) / ln(original_max_position_embeddings))`` with ``s =
    max_position_embeddings / original_max_position_embeddings`` (1 where ``s <= 1``)."""


@dataclass
class ArchitectureConfig:
    """A decoder of one of the supported families (``config/families.py``) in HF ``config.json`` terms.

    Used as-is for weight-free runs (benchmarks, tests with random weights). When a checkpoint is given, its
    ``config.json`` is authoritative and a conflicting value here is an error.
    """

    architectures: List[str] = field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: Optional[str] = None
    """HF ``model_type``; ``None`` means the usual one of ``architectures`` (``llama`` for LlamaForCausalLM)."""
    num_hidden_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    """Per-head width; ``None`` means ``hidden_size // num_attention_heads``."""
    intermediate_size: int = 128
    vocab_size: int = 256
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: Optional[int] = None
    """Sliding-window attention (Mistral, Phi-3, Qwen2 with ``use_sliding_window``; not Llama, whose transformers
    class has none): a query at position i attends keys
    j with ``i - sliding_window < j <= i`` of its own sequence, as in transformers. ``None``: the whole sequence."""
    layer_types: Optional[List[str]] = None
    """Per layer, HF's ``sliding_attention`` or ``full_attention``: which layers use ``sliding_window`` (interleaved
    local and global layers). ``None`` with a window: every layer."""
    query_pre_attn_scalar: Optional[int] = None
    """Gemma: attention scores are scaled by ``query_pre_attn_scalar ** -0.5``. ``None``: by ``head_dim ** -0.5``."""
    rope_local_base_freq: Optional[float] = None
    """Gemma 3: the RoPE base of the sliding-window layers (without ``rope_scaling``, which applies to the
    full-attention layers only). ``None``: every layer uses ``rope_theta``."""
    attn_logit_softcapping: Optional[float] = None
    """Gemma 2: attention scores (after the ``query_pre_attn_scalar`` scale, before the mask and softmax) become
    ``tanh(score / cap) * cap``. ``None``: no cap."""
    final_logit_softcapping: Optional[float] = None
    """Gemma 2: output logits become ``tanh(logit / cap) * cap`` before the loss, sampling and scoring. ``None``: no
    cap."""
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    """End-of-sequence id; when config.json lists several, the first of them."""
    eos_token_ids: Optional[List[int]] = None
    """Every end-of-sequence id when config.json lists several (Llama-3 instruct: end_of_text, eom, eot);
    generation stops at any of them. ``None`` means just ``eos_token_id``."""


ATTENTION_KERNELS = ("auto", "torch", "fa4")
RECOMPUTE_MODULES = ("core_attn", "mlp")


@dataclass
class ModelConfig:
    """One customizable model: run defaults plus where its weights and tokenizer come from."""

    name: str = "tiny-llama"
    checkpoint: Optional[str] = None
    """HF checkpoint directory (config.json, *.safetensors, tokenizer files), or a Hugging Face Hub model ID
    (``Qwen/Qwen3-0.6B``, ``org/name@revision``) taken from huggingface_hub's cache, downloaded there when missing
    and not offline (``checkpoints.hub``); a local folder of that name wins. Overrides ``embedded``."""
    checkpoint_revision: Optional[str] = None
    """The Hub commit a ``checkpoint`` model ID resolved to, recorded by the job in its config.yaml: a resume, or a
    rerun from that config, trains on the same weights whatever was pushed since. To choose a revision yourself,
    write it into the ID (``org/name@revision``)."""
    embedded: Optional[str] = None
    """Name of a checkpoint shipped inside a Python package (``smollm2-135m-instruct``), converted once to a cache."""
    random_weights: bool = False
    """Use randomly initialized weights (benchmarks and tests only); needs ``tokenizer`` or token-id data."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to the checkpoint directory."""
    max_seq_length: int = 2048
    """Longest training sequence (prompt + completion tokens); longer rows lose prompt tokens from the left (chat rows:
    trailing turns), and rows whose completion alone is longer are dropped."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    use_sequence_parallel: bool = False
    attention_kernel: str = "auto"
    """Flash attention for packed batches on GPUs: ``auto`` (FlashAttention-4 where the ``flash-attn-4`` package is
    installed and the GPU is a Hopper or Blackwell, else torch's FlashAttention-2), ``torch``, or ``fa4`` (required;
    refused before any work where it cannot run). Extra: ``pip install 'nemo_customizer[fa4]'``."""
    sequence_packing_supported: bool = True
    chat_template: Optional[str] = None
    """Chat template overriding the tokenizer's own: a shipped name (``chatml-tools``: ChatML with Hermes-style tool
    calls), a path to a ``.jinja`` file, or the Jinja text."""
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    architecture_from_checkpoint: bool = False
    """Take the whole architecture from the checkpoint's config.json instead of checking it against this YAML
    (``model=hf``: any checkpoint of a supported family without a model YAML of its own)."""


@dataclass
class LoraConfig:
    """LoRA adapter settings (NeMo Customizer's ``hyperparameters.lora``)."""

    adapter_dim: int = 8
    """Rank r of the low-rank update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / adapter_dim``."""
    adapter_dropout: float = 0.05
    target_modules: Optional[List[str]] = None
    """HF names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Phi-3: qkv_proj, o_proj,
    gate_up_proj, down_proj) or Megatron names (linear_qkv, linear_proj, linear_fc1, linear_fc2); a Megatron fused
    name stands for all of its HF parts. ``None``: the family's query and value projections (q_proj, v_proj; Phi-3,
    whose query, key and value are one HF module: qkv_proj), filled in once the model's family is known."""


@dataclass
class EarlyStoppingConfig:
    """Stop when validation loss has not improved by ``min_delta`` for ``patience`` validations."""

    enabled: bool = True
    patience: int = 10
    min_delta: float = 0.001


@dataclass
class DpoConfig:
    """Direct preference optimization (``training_type: dpo``), in NeMo Customizer's names; defaults as NeMo RL's
    DPO recipe, which the product runs. Per pair, with log-probabilities of the response tokens only::

        loss = preference_loss_weight * -log σ(β·((π_c - ref_c) - (π_r - ref_r)))
             + sft_loss_weight * -π_c

    averaged over the pairs of the global batch; the rewards reported are ``β·(π - ref)`` of each response."""

    ref_policy_kl_penalty: float = 0.05
    """β: how strongly the policy is held to the reference (the model before training). Larger stays closer."""
    preference_loss_weight: float = 1.0
    """Weight of the preference (DPO) term."""
    preference_average_log_probs: bool = False
    """The preference term compares the responses' mean token log-probabilities instead of their sums (less
    sensitive to response length)."""
    sft_loss_weight: float = 0.0
    """Weight of the negative log-likelihood of the chosen response (0: none)."""
    sft_average_log_probs: bool = False
    """The SFT term is the chosen response's mean token loss instead of its sum."""


@dataclass
class HyperparametersConfig:
    """Training hyperparameters, named as NeMo Customizer names them."""

    training_type: str = "sft"
    """``sft`` (prompt/completion or chat rows) or ``dpo`` (preference pairs; ``dpo`` below)."""
    finetuning_type: str = "lora"
    epochs: int = 3
    batch_size: int = 16
    """Global batch size: examples (``dpo``: pairs) per optimizer step across all data-parallel ranks."""
    micro_batch_size: int = 1
    """Examples (``dpo``: pairs) per forward/backward pass on one rank; the rest is gradient accumulation."""
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0
    """Cosine decay ends here."""
    weight_decay: float = 0.01
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    clip_grad: float = 1.0
    seed: int = 42
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (cuts the schedule short; for smoke tests and demos)."""
    val_check_interval: Optional[int] = None
    """Also validate every N optimizer steps (validation always runs at the end of each epoch)."""
    sequence_packing_enabled: bool = False
    """Pack training examples into bins of at most ``max_seq_length`` tokens (attention, positions and labels never
    cross an example); ``batch_size`` is converted to bins so each step sees about as many tokens, and each epoch as
    many steps, as unpacked (bins shrink where a full-length one would hold more than a step's examples). A packed
    micro batch holds at most ``micro_batch_size`` bins. Validation stays unpacked.
    Ignored, with a warning, for a model whose ``sequence_packing_supported`` is false."""
    cuda_graphs: bool = False
    """Replay each packed micro batch's forward and backward as a captured CUDA graph (one per padded shape; the
    first micro batch of a shape runs eagerly). Removes the CPU's launch overhead, which decides the step time of
    small models. Needs ``sequence_packing_enabled``, a CUDA device, bf16 and ``pipeline_parallel_size=1``
    (``config.validate`` says why); tensor and sequence parallelism's collectives are captured with the rest."""
    activation_checkpointing: bool = False
    """Keep only each transformer layer's input for the backward pass and recompute the layer there: activation
    memory of one layer instead of all, for ~1/3 more compute (long sequences, full fine-tuning of large models)."""
    recompute_modules: List[str] = field(default_factory=list)
    """Selective activation recomputation: these parts of every layer keep no activations for the backward pass and
    are recomputed there (mcore's ``recompute_granularity=selective``): ``mlp`` (the MLP; its fc1 output and
    activation are the largest share of a layer's activations), ``core_attn`` (attention's core: with flash attention
    it keeps little). Less memory than keeping everything, less compute than ``activation_checkpointing``; not with
    it, nor with ``cuda_graphs``. (mcore's ``layernorm`` choice needs Transformer Engine in megatron-core 0.16.1: its
    output-discarding checkpoint always takes the FP8 path.)"""
    fp32_master_weights: bool = True
    """bf16 runs keep an fp32 copy of every trained weight, fp32 gradients and fp32 Adam moments (mixed precision).
    false: the bf16 weights are updated in place, with bf16 gradients and moments and stochastically rounded updates
    (``training.bf16_adamw``): 8 instead of 18 bytes of training state per trained parameter, for full fine-tuning
    of larger models on fewer GPUs. Needs precision bf16; not with ``use_distributed_optimizer``."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state (fp32 master weights and Adam moments) over data-parallel ranks with Megatron's
    distributed optimizer: for full fine-tuning at DP > 1. Needs CUDA (NCCL) when DP > 1."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """Preference-tuning settings, read with ``training_type: dpo``."""


@dataclass
class ColumnsConfig:
    """The data's own column names for the fields rows are read by: each set field is read from that column
    (``columns.prompt=question`` reads ``question`` as the prompt). Unset fields keep their names."""

    prompt: Optional[str] = None
    """Prompt/completion rows, and preference pairs' prompt."""
    completion: Optional[str] = None
    messages: Optional[str] = None
    """Chat rows' OpenAI-style messages."""
    tools: Optional[str] = None
    """Chat rows' tool schemas."""
    chosen: Optional[str] = None
    """Preference pairs' chosen response (with ``prompt`` and ``rejected``: TRL's layout)."""
    rejected: Optional[str] = None
    instruction: Optional[str] = None
    """Alpaca rows (``instruction``, ``input``, ``output``; become prompt/completion rows)."""
    input: Optional[str] = None
    output: Optional[str] = None
    conversations: Optional[str] = None
    """ShareGPT rows (``from``/``value`` turns; become chat rows)."""
    system: Optional[str] = None
    """ShareGPT rows' system prompt."""


@dataclass
class DatasetSourceConfig:
    """One dataset of ``dataset.mix``."""

    path: str = ""
    """As ``dataset.path`` (required)."""
    weight: float = 1.0
    """Its share of the training rows, relative to the other entries' weights (see ``dataset.mix``)."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    train_split: Optional[str] = None
    val_split: Optional[str] = None


@dataclass
class DatasetConfig:
    """Training data: a file (JSONL, JSON, CSV/TSV, Parquet, Arrow), a directory with training*/validation* files, a
    ``save_to_disk`` folder, a Hub dataset ID, or a stored dataset's name; or several of them with mixing weights."""

    path: str = MISSING_PATH
    """A file or directory; else the name of a dataset in ``store_dir`` (``datasets upload``); else a Hugging Face Hub
    dataset ID ``org/name`` or ``org/name:config`` (Parquet, Arrow, saved folders and Hub IDs need the ``[datasets]``
    extra)."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """The data's own column names (``columns.prompt=question columns.completion=answer``)."""
    train_split: Optional[str] = None
    """A saved folder's or Hub dataset's training split; default: the one named ``train*``/``training*``."""
    val_split: Optional[str] = None
    """Its validation split; default: the one named ``validation*``/``val*``, else a seeded hold-out."""
    mix: List[DatasetSourceConfig] = field(default_factory=list)
    """Several datasets of one format instead of ``path``: ``[{path: a, weight: 0.7}, {path: b, weight: 0.3}]``.
    The training set has as many rows as theirs together, each entry giving its weight's share (a seeded subset, or
    its rows repeated), drawn once per job; validation keeps each entry's own validation rows, unweighted."""
    val_fraction: float = 0.1
    """Fraction held out for validation when the dataset has no validation file (seeded split)."""
    max_val_examples: Optional[int] = None
    """Cap on validation rows (keeps frequent validation cheap)."""
    store_dir: Optional[str] = None
    """Dataset store that names in ``path`` are looked up in; default ``$NEMO_CUSTOMIZER_DATASETS``, else
    ``$NEMO_CUSTOMIZER_CACHE/datasets``, else ~/.cache/nemo_customizer/datasets."""


@dataclass
class EvaluationConfig:
    """Held-out evaluation inside a job: the base model before training and the best checkpoint after it, with task
    metrics (``nemo_customizer.evaluate`` runs the same outside a job). Off by default: it generates an answer for
    every held-out row."""

    enabled: bool = False
    """Evaluate; also turned on by setting ``dataset``."""
    dataset: Optional[str] = None
    """Held-out JSONL file (prompt/completion or chat, validated like training data); default: the training data
    directory's ``test*.jsonl``."""
    metrics: List[str] = field(default_factory=list)
    """Metric names (``python -m nemo_customizer evaluate --help`` lists them); empty: chosen from the data (labels,
    free text, chat, tool calls). Loss and perplexity on the completion tokens are always reported."""
    compare_base: bool = True
    """Also evaluate the base model (before training), for the before/after comparison."""
    max_tokens: Optional[int] = None
    """Most tokens generated per row; default: the longest reference's tokens plus 16."""
    stop: List[str] = field(default_factory=list)
    """Stop strings for generation (cut from the answer)."""
    batch_size: int = 16
    """Rows generated together."""
    max_examples: Optional[int] = None
    """Evaluate only the first N rows."""


@dataclass
class CheckpointConfig:
    """Resumable checkpoints in ``<output_dir>/checkpoints`` (``megatron.core.dist_checkpointing``), written at
    each validation and when the job is cancelled. Running a job again with the same ``output_dir`` resumes from
    the last one, also at another parallel layout (with the distributed optimizer: the same tensor/pipeline-parallel
    sizes, any data-parallel size). A full fine-tune's checkpoint is ~14 bytes per parameter; the job checks for
    room for ``keep_last + 1`` of them before it starts."""

    enabled: bool = True
    keep_last: int = 1
    """How many checkpoints to keep (the newest)."""


@dataclass
class WandbConfig:
    """A Weights & Biases run of the job (``pip install 'nemo_customizer[wandb]'``). W&B's own environment variables
    apply where a field is unset (``WANDB_API_KEY``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_MODE``,
    ``WANDB_DIR``)."""

    enabled: bool = False
    project: Optional[str] = None
    """Default ``$WANDB_PROJECT``, else ``nemo_customizer``."""
    entity: Optional[str] = None
    """Team or user the run belongs to; default ``$WANDB_ENTITY``, else your W&B default."""
    name: Optional[str] = None
    """The run's display name; default the ``output_dir``'s name."""
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None
    """``online`` or ``offline`` (written under ``dir``; upload later with ``wandb sync``); default
    ``$WANDB_MODE``, else online."""
    dir: Optional[str] = None
    """Where W&B writes its local files (a ``wandb/`` folder); default ``$WANDB_DIR``, else the ``output_dir``."""


@dataclass
class MlflowConfig:
    """An MLflow run of the job (``pip install 'nemo_customizer[mlflow]'``, the ``mlflow-skinny`` client)."""

    enabled: bool = False
    tracking_uri: Optional[str] = None
    """Your tracking server (``http://host:5000``), ``databricks``, or a local store; default
    ``$MLFLOW_TRACKING_URI``, else MLflow's default (a local ``sqlite:///mlflow.db``, which needs the full ``mlflow``
    package; a ``file:`` store needs ``MLFLOW_ALLOW_FILE_STORE=true`` since MLflow 3)."""
    experiment_name: Optional[str] = None
    """Default ``$MLFLOW_EXPERIMENT_NAME``, else ``nemo_customizer``; created when missing."""
    run_name: Optional[str] = None
    """Default the ``output_dir``'s name."""


@dataclass
class LoggerConfig:
    """Experiment trackers the job logs to beside ``metrics.jsonl``, ``status.json`` and TensorBoard (main rank
    only): the resolved config, then every train and validation record as metrics ``train/<key>`` and ``val/<key>``.
    A job resumed in the same ``output_dir`` continues the same runs (their ids are kept in ``trackers.json``)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class ServingConfig:
    """The OpenAI-compatible server (``python -m nemo_customizer serve``): one base model plus LoRA adapters."""

    host: str = "127.0.0.1"
    """Interface to bind; the loopback default keeps the server private to this machine. ``0.0.0.0`` exposes it
    (then set an ``api_key``)."""
    port: int = 8000
    api_key: Optional[str] = None
    """Key clients must send as ``Authorization: Bearer KEY``; default ``$NEMO_CUSTOMIZER_API_KEY``; unset: none."""
    model_name: Optional[str] = None
    """Name the base model is served under (``"model"`` in requests); default ``model.name``. Adapters are served
    as ``MODEL_NAME@ADAPTER`` (or just ``ADAPTER``)."""
    adapters_dir: Optional[str] = None
    """Directory of adapters: each ``NAME/adapter_config.json`` (an HF PEFT adapter) or ``NAME/adapter/`` (a
    customization job's output directory) is served as ``NAME``; directories dropped in later are found too."""
    preload_adapters: bool = False
    """Load every adapter in ``adapters_dir`` at start instead of on its first request."""
    allow_runtime_adapters: bool = True
    """Accept ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's endpoints)."""
    max_lora_rank: int = 64
    """Highest adapter rank r the server loads."""
    max_tokens: int = 4096
    """Upper limit on a request's ``max_tokens`` (a larger value is a 400 error); also the default for chat."""
    max_request_bytes: int = 1048576
    """Largest request body accepted (413 above it)."""
    max_choices: int = 64
    """Upper limit on the completions one request asks for: ``n`` times the number of prompts."""
    max_batch_size: int = 16
    """Sequences decoded together; further requests wait for a free row (continuous batching)."""
    log_level: str = "info"
    """uvicorn's log level: critical, error, warning, info, debug, trace."""


@dataclass
class Config:
    """A whole customization job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    hyperparameters: HyperparametersConfig = field(default_factory=HyperparametersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Weights & Biases and MLflow runs of the job (off by default)."""
    output_dir: str = "outputs/job"
    """Job directory: resolved config, metrics.jsonl, adapter."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    precision: str = "auto"
    """``auto`` (bf16 on cuda, fp32 on cpu), ``fp32``, ``bf16`` or ``fp8``: a LoRA job on a GPU of compute capability
    9.0+ (Hopper) whose frozen base linears are held in FP8 with per-row scales and run their GEMMs in FP8; adapters,
    norms, attention, embedding, LM head and loss stay bf16 (``models.fp8_linear``). Inference runs fp8 as bf16."""
    cache_dir: Optional[str] = None
    """Where embedded checkpoints are converted; default ``$NEMO_CUSTOMIZER_CACHE`` or ~/.cache/nemo_customizer."""
    log_interval: int = 1
    """Print a progress line every N steps when stderr is not a terminal (metrics.jsonl records every step); also
    how often status.json is rewritten (and at most ~1% of the job's time)."""
    progress_bar: bool = True
    serving: ServingConfig = field(default_factory=ServingConfig)
    """The inference server's settings (``serve``)."""
