"""Build megatron-core's GPTModel for an architecture of a supported family, with a loss head that skips unmasked tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_customizer.checkpoints.hf_loader import SafetensorsCheckpoint, load_hf_weights
from nemo_customizer.checkpoints.mappings import TPShard
from nemo_customizer.checkpoints.image_text import TextModelWeights
from nemo_customizer.compat import GPTModelHooks
from nemo_customizer.config.families import family_of
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama
from nemo_customizer.models.loss import masked_token_losses
from nemo_customizer.models.registry import family_for
from nemo_customizer.models.layer_rope import stack_tables
from nemo_customizer.models.softcap import softcap
from nemo_customizer.models.longrope import LongRoPE, inverse_frequencies as longrope_inverse_frequencies
from nemo_customizer.models.rope import PackedRotaryParams, token_angles
from nemo_customizer.models.spec import LayerOptions, llama_block_spec


class CustomizerGPTModel(GPTModelHooks):
    """GPTModel whose training forward returns the per-token loss of loss-masked positions only.

    With ``labels`` and ``loss_mask`` given, the output projection runs only on positions with ``loss_mask > 0``:
    a prompt/completion row trains on a handful of completion tokens, so projecting every prompt token onto the
    vocabulary would be wasted compute and memory. Returns the losses of those positions, flattened, in fp32.
    Without labels it behaves like GPTModel (logits ``[b, s, vocab]``).

    A family's model may also scale the embeddings (``embedding_scale``: Gemma's √hidden), give its
    sliding-window layers their own RoPE (``sliding_rotary_pos_emb``: Gemma 3, see ``models.layer_rope``),
    switch to a second RoPE table for long sequences (``long_rope``: Phi-3's longrope, see ``models.longrope``) and
    softcap its logits (``cap_logits``: Gemma 2).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding_scale: Optional[float] = None
        self.sliding_rotary_pos_emb: Optional[torch.nn.Module] = None
        self.long_rope: Optional[LongRoPE] = None
        self.final_logit_softcapping: Optional[float] = None
        self.per_position_loss_grads = False
        """The training loss gives each position's token loss its own gradient (a preference loss), not the same
        one (a sum): the loss head then keeps a trained output weight's gradient exact for that (``models.loss``)."""

    def cap_logits(self, cap: float) -> None:
        """Softcap every logit this model makes, ``tanh(logit / cap) * cap`` (``final_logit_softcapping``): the loss
        head's, and the output layer's, from which mcore's forward returns logits (generation, scoring,
        ``forward_logits``) or computes its own loss."""
        self.final_logit_softcapping = cap
        if self.post_process:
            self.output_layer.register_forward_hook(SoftcappedOutput(cap))

    def forward(self, input_ids, position_ids, attention_mask, *args, packed_seq_params=None, **kwargs):
        if (packed_seq_params is not None and packed_seq_params.qkv_format == "thd" and position_ids is not None
                and self.position_embedding_type == "rope"):
            length = int(packed_seq_params.max_seqlen_q)
            freqs = self.rotary_pos_emb(length)
            angles = token_angles(freqs, position_ids) if self.long_rope is None else \
                self.long_rope.packed(freqs, position_ids, packed_seq_params.cu_seqlens_q, length)
            sliding = None if self.sliding_rotary_pos_emb is None else \
                token_angles(self.sliding_rotary_pos_emb(length), position_ids)
            packed_seq_params = PackedRotaryParams.build(packed_seq_params, angles, self.config.params_dtype,
                                                         sliding_angles=sliding)
        elif self.long_rope is not None:
            self.long_rope.select_rows(attention_mask, kwargs.get("inference_context"),
                                       new_tokens=position_ids.shape[1] if position_ids is not None else 0)
        return super().forward(input_ids, position_ids, attention_mask, *args, packed_seq_params=packed_seq_params,
                               **kwargs)

    def prepare_decoder_input(self, decoder_input, rotary_pos_emb, packed_seq_params):
        if decoder_input is not None and self.embedding_scale is not None:
            # transformers multiplies by the scale cast to the embedding's dtype (√1152 is 33.94 in fp32 but 34.0 in
            # bf16): the same rounded value here, applied in the same precision.
            decoder_input = decoder_input * float(torch.tensor(self.embedding_scale, dtype=decoder_input.dtype))
        if isinstance(packed_seq_params, PackedRotaryParams):
            rotary_pos_emb = None  # no mcore RoPE: CoreAttention rotates with the per-token cos/sin
        elif rotary_pos_emb is not None and self.long_rope is not None:
            rotary_pos_emb = self.long_rope.table(rotary_pos_emb)
        elif rotary_pos_emb is not None and self.sliding_rotary_pos_emb is not None:
            rotary_pos_emb = stack_tables(rotary_pos_emb, self.sliding_rotary_pos_emb(rotary_pos_emb.shape[0]))
        if (self.config.recompute_granularity == "full" and torch.is_grad_enabled() and decoder_input is not None
                and not decoder_input.requires_grad):
            # mcore recomputes layers through a reentrant autograd.Function, whose output needs grad only if an input
            # does: with a frozen embedding (LoRA) no layer output would, and the adapters would get no gradient.
            decoder_input = decoder_input.detach().requires_grad_()
        return decoder_input, rotary_pos_emb

    def loss_head(self, hidden_states, labels, loss_mask: Union[torch.Tensor, "LossPositions", None]):
        if labels is None or not self.post_process or loss_mask is None:
            return None  # mcore's output layer: logits
        if self.config.sequence_parallel:
            # (s/tp, b, h) → (s, b, h). Backward only splits: the reduction over vocab shards happens once, in
            # copy_to_tensor_model_parallel_region below.
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        if not isinstance(loss_mask, LossPositions):
            loss_mask = LossPositions(loss_positions(loss_mask, hidden_states.device))  # (n,) into flattened (s, b)
        index, loss_weight = loss_mask.index, loss_mask.weight
        hidden = hidden_states.flatten(0, 1).index_select(0, index)  # (n, h)
        targets = labels.transpose(0, 1).flatten().index_select(0, index)  # (n,)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else \
            self.output_layer.weight
        return masked_token_losses(hidden, targets, weight, loss_weight, softcap=self.final_logit_softcapping,
                                   per_position_grads=self.per_position_loss_grads, token_hits=loss_mask.token_hits)


@dataclass(frozen=True)
class SoftcappedOutput:
    """A forward hook of mcore's output layer (it returns ``(logits, bias)``) that softcaps the logits, whichever
    vocabulary shard and dtype they are in."""

    cap: float

    def __call__(self, module: torch.nn.Module, args, output):
        logits, bias = output
        return softcap(logits, self.cap), bias


@dataclass
class LossPositions:
    """Loss positions already on the device, for ``loss_mask``: a CUDA graph replays a fixed number of them, so
    the index is padded (``training.graphs``) and ``weight`` (1 real, 0 padding) zeroes the padding's losses;
    validation asks for ``token_hits`` with them."""

    index: torch.Tensor
    """(n,) int64 positions in the flattened ``(s, b)`` layout."""
    weight: Optional[torch.Tensor] = None
    """(n,) float32 multiplier of each position's loss."""
    token_hits: bool = False
    """The model returns ``(losses, hits)``: ``hits`` (n,) bool, whether each position's argmax prediction is its
    target (``models.loss.argmax_hits``). Forward passes without gradients only (validation's token accuracy)."""


def loss_positions(loss_mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Positions with ``loss_mask > 0`` in the flattened ``(s, b)`` layout, as an index tensor on ``device``.

    How many positions carry loss decides the shape of everything after, so selecting them from a mask on the GPU
    (``hidden[mask]``) reads the count back: a host sync per micro batch in forward and again in backward, each
    draining the queue of launched kernels. The training step therefore keeps ``loss_mask`` on the host; the
    positions are found there and copied over without waiting (pinned memory, non-blocking).
    """
    return upload((loss_mask.transpose(0, 1) > 0).flatten().nonzero().squeeze(1), device)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait for the GPU's queue.

    From pageable host memory a "non-blocking" copy may still wait for the stream; from pinned memory it does not.
    """
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies exactly as ``transformers`` computes them."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(arch: ArchitectureConfig) -> torch.Tensor:
    """RoPE inverse frequencies exactly as ``transformers`` computes them, with Llama-3 or linear scaling when
    configured (longrope: its short factors, the table of sequences within the original context).

    mcore's own rope scaling hard-codes low/high frequency factors and the original context; this uses the
    checkpoint's values.
    """
    inv_freq = default_inv_freq(arch.rope_theta, llama.head_dim(arch))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # positions divided by the factor, i.e. every frequency
        return inv_freq / scaling.factor
    if scaling.rope_type == "longrope":
        return longrope_inverse_frequencies(arch.rope_theta, llama.head_dim(arch), scaling.short_factor)
    if scaling.rope_type not in ("llama3",):
        raise ValueError(f"rope_scaling type {scaling.rope_type!r} is not supported (llama3, linear, longrope)")
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def transformer_config(
    arch: ArchitectureConfig,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    perform_initialization: bool = True,
    init_method_std: float = 0.02,
    activation_checkpointing: bool = False,
    recompute_modules: Sequence[str] = (),
) -> TransformerConfig:
    """mcore's config for ``arch``. ``activation_checkpointing``: keep only each layer's input for backward and
    recompute the layer (mcore's full, uniform recomputation, one layer at a time). ``recompute_modules``: recompute
    only these parts of each layer (mcore's selective recomputation: ``mlp``, ``core_attn``)."""
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if activation_checkpointing else {}
    if recompute_modules:
        recompute = dict(recompute_granularity="selective", recompute_modules=list(recompute_modules))
    return TransformerConfig(
        **recompute,
        **family_for(arch).transformer_fields(arch),
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=perform_initialization,
        init_method_std=init_method_std,
        # The MLP calls our SwiGLU module (models.swiglu, named in the layer spec) on fc1's whole output: mcore's hook
        # for that is named after Transformer Engine, which is not involved.
        bias_activation_fusion=False,
        use_te_activation_func=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Switched on per trained layer by training.wrap, once DDP has made the gradient buffers it adds into.
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        calculate_per_token_loss=True,
    )


def build_gpt_model(arch: ArchitectureConfig, config: TransformerConfig, device: torch.device, *,
                    attention_kernel: str = "auto") -> CustomizerGPTModel:
    """This rank's (TP/PP) shard of the model, on ``device``; weights random until a checkpoint is loaded.
    ``attention_kernel``: ``model.attention_kernel`` (``models.flash_attn4``)."""
    if arch.vocab_size % config.tensor_model_parallel_size:
        raise ValueError(
            f"vocab_size {arch.vocab_size} is not divisible by tensor_parallel_size "
            f"{config.tensor_model_parallel_size}; choose a tensor_parallel_size that divides it."
        )
    family = family_for(arch)
    model = CustomizerGPTModel(
        config=config,
        transformer_layer_spec=llama_block_spec(config, attention_kernel, getattr(family, "LAYER", LayerOptions()),
                                                attn_logit_softcapping=arch.attn_logit_softcapping),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    model.rotary_pos_emb.inv_freq = llama3_inv_freq(arch).to(device)
    if getattr(family, "SCALED_EMBEDDINGS", False):
        model.embedding_scale = arch.hidden_size ** 0.5
    if arch.final_logit_softcapping is not None:
        model.cap_logits(arch.final_logit_softcapping)
    if arch.rope_scaling is not None and arch.rope_scaling.rope_type == "longrope":
        model.long_rope = LongRoPE(arch, config.kv_channels, device)
    if arch.rope_local_base_freq is not None:
        sliding = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, use_cpu_initialization=True)
        sliding.inv_freq = default_inv_freq(arch.rope_local_base_freq, config.kv_channels).to(device)
        model.sliding_rotary_pos_emb = sliding
    if not config.perform_initialization:
        _mark_tensor_parallel_weights(model)
    return model.to(device)


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag sharded weights as tensor-parallel when mcore skipped initialization.

    mcore sets ``tensor_model_parallel``/``partition_dim`` only inside its weight-init helpers
    (tensor_parallel/layers.py ``_initialize_affine_weight_cpu``/``_gpu``), so with ``perform_initialization=False``
    (weights about to be loaded) every shard looks replicated, and the gradient norm then counts only TP rank 0's
    shards. Clipping full fine-tuning at TP>1 would differ from TP=1.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=0, stride=1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=1, stride=1)


def stage_layer_numbers(model: GPTModel) -> list[int]:
    """0-based global layer indices of this pipeline stage's layers, in local order."""
    return [layer.layer_number - 1 for layer in model.decoder.layers]


def unwrap(model: torch.nn.Module) -> CustomizerGPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(model, GPTModel):
        model = model.module
    return model


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
    """Full-vocabulary logits ``[b, s, vocab]`` (gathered over TP) for a padded batch; for tests and inference."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, position_ids, None, runtime_gather_output=True)


def load_hf_checkpoint(model: CustomizerGPTModel, arch: ArchitectureConfig, directory: str) -> None:
    """Load this rank's TP/PP shard of an HF checkpoint directory into ``model`` (``hf_state.hf_state_dict`` is the
    inverse)."""
    mappings = family_for(arch).weight_mappings(
        arch, stage_layer_numbers(model), pre_process=model.pre_process, post_process=model.post_process
    )
    tp = TPShard(parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size())
    checkpoint = SafetensorsCheckpoint(directory)
    if family_of(arch.architectures, arch.model_type).image_text:
        checkpoint = TextModelWeights(checkpoint)  # the text model's tensors; the vision tower's stay on disk
    load_hf_weights(model, checkpoint, mappings, tp)


def build_model_for_job(model_cfg, checkpoint_dir, *, device: torch.device, params_dtype: torch.dtype,
                        activation_checkpointing: bool = False, recompute_modules: Sequence[str] = ()):
    """This rank's model for a job: built from ``model_cfg`` and, unless the weights are random, loaded.

    Returns ``(model, transformer_config)``.
    """
    arch = model_cfg.architecture
    config = transformer_config(
        arch,
        tensor_parallel_size=model_cfg.tensor_parallel_size,
        pipeline_parallel_size=model_cfg.pipeline_parallel_size,
        sequence_parallel=model_cfg.use_sequence_parallel,
        params_dtype=params_dtype,
        device=device,
        perform_initialization=checkpoint_dir is None,
        activation_checkpointing=activation_checkpointing,
        recompute_modules=recompute_modules,
    )
    model = build_gpt_model(arch, config, device, attention_kernel=model_cfg.attention_kernel)
    if checkpoint_dir is not None:
        load_hf_checkpoint(model, arch, str(checkpoint_dir))
    return model, config
