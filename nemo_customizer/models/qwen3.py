"""Qwen3 (dense): the Llama layer with an RMSNorm on each query and key head before RoPE (mcore's
``qk_layernorm``; ``models/spec.py`` puts our RMSNorm there). ``head_dim`` is its own config key (128 in every
size), independent of hidden/heads. No biases.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_customizer.checkpoints.mappings import Replicated, WeightMapping
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama
from nemo_customizer.models.llama import HF_MODULE_PREFIX, HF_PROJECTIONS, head_dim  # noqa: F401 (the family's API)


def transformer_fields(arch: ArchitectureConfig) -> dict:
    return {**llama.transformer_fields(arch), "qk_layernorm": True}


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    mappings = llama.weight_mappings(arch, layer_numbers, pre_process=pre_process, post_process=post_process)
    for local, layer in enumerate(layer_numbers):
        mc, hf = f"decoder.layers.{local}.self_attention.", f"model.layers.{layer}.self_attn."
        mappings[mc + "q_layernorm.weight"] = Replicated(hf + "q_norm.weight")
        mappings[mc + "k_layernorm.weight"] = Replicated(hf + "k_norm.weight")
    return mappings
