"""The Llama family, declaratively: HF config keys → TransformerConfig fields, and HF → Megatron weight names.

Llama 2/3.x and SmolLM2 use this file. A new family (Qwen2 adds qkv biases, for example) is one more file like it.
"""

from __future__ import annotations

from typing import Dict, List

import torch.nn.functional as F

from nemo_customizer.checkpoints.mappings import QKV, GatedMLP, Replicated, Split, WeightMapping
from nemo_customizer.config.families import SEPARATE_PROJECTIONS
from nemo_customizer.config.schema import ArchitectureConfig

# HF config.json key → megatron.core TransformerConfig field.
CONFIG_KEYS: Dict[str, str] = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "rms_norm_eps": "layernorm_epsilon",
}

# What every Llama layer is, independent of size.
FIXED_TRANSFORMER_FIELDS = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    add_qkv_bias=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def head_dim(arch: ArchitectureConfig) -> int:
    return arch.head_dim or arch.hidden_size // arch.num_attention_heads


def transformer_fields(arch: ArchitectureConfig) -> dict:
    """TransformerConfig keyword arguments for this architecture."""
    fields = {mcore: getattr(arch, hf) for hf, mcore in CONFIG_KEYS.items()}
    fields["kv_channels"] = head_dim(arch)
    fields.update(FIXED_TRANSFORMER_FIELDS)
    fields.update(window_fields(arch))
    return fields


def window_fields(arch: ArchitectureConfig) -> dict:
    """Sliding-window attention in mcore's terms (flash attention's ``(left, right)``): HF's window of W keys is
    the query's own position and W - 1 before it; ``window_attn_skip_freq`` lists per layer whether it is windowed
    (1) or attends fully (0). ``models.attention.CoreAttention`` reads both."""
    if arch.sliding_window is None:
        return {}
    fields = {"window_size": (arch.sliding_window - 1, 0)}
    if arch.layer_types is not None:
        fields["window_attn_skip_freq"] = [int(kind == "sliding_attention") for kind in arch.layer_types]
    return fields


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    """Megatron parameter name (in this pipeline stage's model) → mapping from HF tensors.

    ``layer_numbers`` are the 0-based global indices of this stage's layers, in local order.
    """
    mappings: Dict[str, WeightMapping] = {}
    if pre_process:
        mappings["embedding.word_embeddings.weight"] = Split("model.embed_tokens.weight", dim=0)
    for local, layer in enumerate(layer_numbers):
        mc, hf = f"decoder.layers.{local}.", f"model.layers.{layer}."
        mappings[mc + "input_layernorm.weight"] = Replicated(hf + "input_layernorm.weight")
        mappings[mc + "self_attention.linear_qkv.weight"] = QKV(
            hf + "self_attn.q_proj.weight", hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight",
            num_heads=arch.num_attention_heads, num_groups=arch.num_key_value_heads, head_dim=head_dim(arch),
        )
        mappings[mc + "self_attention.linear_proj.weight"] = Split(hf + "self_attn.o_proj.weight", dim=1)
        mappings[mc + "pre_mlp_layernorm.weight"] = Replicated(hf + "post_attention_layernorm.weight")
        mappings[mc + "mlp.linear_fc1.weight"] = GatedMLP(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        mappings[mc + "mlp.linear_fc2.weight"] = Split(hf + "mlp.down_proj.weight", dim=1)
    if post_process:
        mappings["decoder.final_layernorm.weight"] = Replicated("model.norm.weight")
        lm_head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        mappings["output_layer.weight"] = Split(lm_head, dim=0)
    return mappings


# HF module names of the projections LoRA can target, per Megatron linear layer (the family table lists them).
HF_PROJECTIONS: Dict[str, List[str]] = {linear: list(names) for linear, names in SEPARATE_PROJECTIONS.items()}
HF_MODULE_PREFIX = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
