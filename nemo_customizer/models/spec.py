"""The decoder layer spec of every family: the only place our transformer building blocks are chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nemo_customizer.models.attention import CoreAttention
from nemo_customizer.models.layer_rope import LayerKindSelfAttention
from nemo_customizer.models.norm import NormThenAdd, RMSNorm
from nemo_customizer.models.swiglu import SwiGLU


@dataclass(frozen=True)
class LayerOptions:
    """What a family's decoder layer has beyond Llama's (a family module's ``LAYER``; Llama's are the defaults)."""

    activation: type = SwiGLU
    """The gated activation over fc1's gate|up output (``models.geglu.GeGLU`` for Gemma)."""
    post_norms: bool = False
    """An RMSNorm on the attention output and on the MLP output, each before its residual add (Gemma)."""
    rope_per_layer_kind: bool = False
    """Sliding-window layers rotate with their own RoPE base (Gemma 3, ``models.layer_rope``)."""


def llama_layer_spec(attention_kernel: str = "auto", qk_norm: bool = False, options: LayerOptions = LayerOptions(),
                     config: Optional[TransformerConfig] = None,
                     attn_logit_softcapping: Optional[float] = None) -> ModuleSpec:
    """Pre-norm decoder layer: RMSNorm, GQA self-attention with RoPE, RMSNorm, SwiGLU MLP (gate/up fused in fc1).
    ``attention_kernel``: ``model.attention_kernel``, the flash attention packed batches get on GPUs. ``qk_norm``:
    an RMSNorm over each query and key head (Qwen3; the family sets mcore's ``qk_layernorm``). ``options``: the
    family's differences; ``config`` is needed for ``options.post_norms`` (the norms' width and epsilon).
    ``attn_logit_softcapping``: the architecture's cap on attention scores (Gemma 2), or None."""
    head_norm = RMSNorm if qk_norm else IdentityOp
    residual_add = get_bias_dropout_add
    if options.post_norms:
        residual_add = ModuleSpec(module=NormThenAdd, params={"config": config})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=LayerKindSelfAttention if options.rope_per_layer_kind else SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=CoreAttention, params={
                        "attention_kernel": attention_kernel, "logit_softcapping": attn_logit_softcapping}),
                    linear_proj=RowParallelLinear,
                    q_layernorm=head_norm,
                    k_layernorm=head_norm,
                ),
            ),
            self_attn_bda=residual_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, activation_func=options.activation,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=residual_add,
        ),
    )


def llama_block_spec(config: TransformerConfig, attention_kernel: str = "auto",
                     options: LayerOptions = LayerOptions(),
                     attn_logit_softcapping: Optional[float] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus our RMSNorm as the final norm (mcore would pick its own norm class)."""
    layers = get_num_layers_to_build(config)
    spec = llama_layer_spec(attention_kernel, qk_norm=config.qk_layernorm, options=options, config=config,
                            attn_logit_softcapping=attn_logit_softcapping)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)
