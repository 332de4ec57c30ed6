"""Phi-3, Phi-3.5 and Phi-4 (``Phi3ForCausalLM``): the Llama layer with q/k/v and gate/up each stored as one HF
tensor (``self_attn.qkv_proj``: q, k, v rows one after the other; ``mlp.gate_up_proj``: gate rows, then up rows).

They load into mcore's fused ``linear_qkv`` (interleaved per query group) and ``linear_fc1`` (gate, then up, per
rank) like Llama's separate tensors do. LoRA targets the fused HF modules as PEFT does (``qkv_proj``,
``gate_up_proj``): one A and one B for the whole fused output, whose B rows are kept in mcore's order and put back
into HF's order on export (``peft.lora.FusedSlice.blocks``). No biases; ``longrope`` RoPE scaling, a partial
rotary factor and a sliding window shorter than the context are refused when config.json is read.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_customizer.checkpoints.mappings import FusedGatedMLP, FusedQKV, WeightMapping
from nemo_customizer.config.families import FUSED_PROJECTIONS
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama
from nemo_customizer.models.llama import head_dim, transformer_fields  # noqa: F401 (the family's API)

HF_PROJECTIONS: Dict[str, List[str]] = {linear: list(names) for linear, names in FUSED_PROJECTIONS.items()}
HF_MODULE_PREFIX = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}


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
