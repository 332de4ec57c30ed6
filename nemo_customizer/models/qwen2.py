"""Qwen2 / Qwen2.5: the Llama layer with biases on q, k and v (never on o_proj or the MLP).

The biases sit in mcore's fused ``linear_qkv.bias``, interleaved per query group like the weight rows. LoRA on q/k/v
adapts the weight only; the bias stays frozen in the base layer, as in ``peft``.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_customizer.checkpoints.mappings import QKV, WeightMapping
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama
from nemo_customizer.models.llama import HF_MODULE_PREFIX, HF_PROJECTIONS, head_dim  # noqa: F401 (the family's API)


def transformer_fields(arch: ArchitectureConfig) -> dict:
    return {**llama.transformer_fields(arch), "add_qkv_bias": True}


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    mappings = llama.weight_mappings(arch, layer_numbers, pre_process=pre_process, post_process=post_process)
    for local, layer in enumerate(layer_numbers):
        hf = f"model.layers.{layer}.self_attn."
        mappings[f"decoder.layers.{local}.self_attention.linear_qkv.bias"] = QKV(
            hf + "q_proj.bias", hf + "k_proj.bias", hf + "v_proj.bias",
            num_heads=arch.num_attention_heads, num_groups=arch.num_key_value_heads, head_dim=head_dim(arch),
        )
    return mappings
