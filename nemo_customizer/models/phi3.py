"""Phi-3, Phi-3.5 and Phi-4 (``Phi3ForCausalLM``): the Llama layer with q/k/v and gate/up each stored as one HF
tensor (``self_attn.qkv_proj``: q, k, v rows one after the other; ``mlp.gate_up_proj``: gate rows, then up rows).

They load into mcore's fused ``linear_qkv`` (interleaved per query group) and ``linear_fc1`` (gate, then up, per
rank) like Llama's separate tensors do. LoRA targets the fused HF modules as PEFT does (``qkv_proj``,
``gate_up_proj``): one A and one B for the whole fused output, whose B rows are kept in mcore's order and put back
into HF's order on export (``peft.lora.FusedSlice.blocks``); the default target is ``qkv_proj`` (where the query
and value projections are). No biases.

Phi-3.5-mini and the Phi-3 128k checkpoints scale RoPE with ``longrope`` (``models.longrope``): its attention
factor multiplies query and key alike, so its square joins the softmax scale here. Phi-3-mini-4k windows every
layer (config.json's ``sliding_window``, which transformers applies to all layers; ``llama.window_fields``). A
partial rotary factor (Phi-4-mini) is refused when config.json is read.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_customizer.checkpoints.mappings import FusedGatedMLP, FusedQKV, WeightMapping
from nemo_customizer.config.families import FUSED_PROJECTIONS
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.config.hf_config import longrope_attention_scale
from nemo_customizer.models import llama
from nemo_customizer.models.llama import head_dim  # noqa: F401 (the family's API)

HF_PROJECTIONS: Dict[str, List[str]] = {linear: list(names) for linear, names in FUSED_PROJECTIONS.items()}
HF_MODULE_PREFIX = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}


def transformer_fields(arch: ArchitectureConfig) -> dict:
    fields = llama.transformer_fields(arch)
    scale = longrope_attention_scale(arch)
    if scale != 1.0:  # (q m) . (k m) / sqrt(d) = q . k m^2 / sqrt(d)
        fields["softmax_scale"] = head_dim(arch) ** -0.5 * scale ** 2
    return fields


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    mappings = llama.weight_mappings(arch, layer_numbers, pre_process=pre_process, post_process=post_process)
    for local, layer in enumerate(layer_numbers):
        mc, hf = f"decoder.layers.{local}.", f"model.layers.{layer}."
        mappings[mc + "self_attention.linear_qkv.weight"] = FusedQKV(
            hf + "self_attn.qkv_proj.weight",
            num_heads=arch.num_attention_heads, num_groups=arch.num_key_value_heads, head_dim=head_dim(arch),
        )
        mappings[mc + "mlp.linear_fc1.weight"] = FusedGatedMLP(hf + "mlp.gate_up_proj.weight")
    return mappings
