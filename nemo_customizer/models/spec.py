"""The decoder layer spec of every family: the only place our transformer building blocks are chosen."""

from __future__ import annotations

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
from nemo_customizer.models.norm import RMSNorm
from nemo_customizer.models.swiglu import SwiGLU


def llama_layer_spec(attention_kernel: str = "auto", qk_norm: bool = False) -> ModuleSpec:
    """Pre-norm decoder layer: RMSNorm, GQA self-attention with RoPE, RMSNorm, SwiGLU MLP (gate/up fused in fc1).
    ``attention_kernel``: ``model.attention_kernel``, the flash attention packed batches get on GPUs. ``qk_norm``:
    an RMSNorm over each query and key head (Qwen3; the family sets mcore's ``qk_layernorm``)."""
    head_norm = RMSNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=CoreAttention, params={"attention_kernel": attention_kernel}),
                    linear_proj=RowParallelLinear,
                    q_layernorm=head_norm,
                    k_layernorm=head_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, activation_func=SwiGLU,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def llama_block_spec(config: TransformerConfig, attention_kernel: str = "auto") -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus our RMSNorm as the final norm (mcore would pick its own norm class)."""
    layers = get_num_layers_to_build(config)
    spec = llama_layer_spec(attention_kernel, qk_norm=config.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)
