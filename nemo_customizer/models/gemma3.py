"""Gemma 3 (text, ``Gemma3ForCausalLM``): the Llama layer with

- embeddings scaled by √hidden (``SCALED_EMBEDDINGS``, in ``models.gpt``),
- RMSNorms that scale by ``1 + weight`` in fp32 (mcore's ``layernorm_zero_centered_gamma``, ``models.norm``),
  four per layer: before and after attention, before and after the MLP (the "after" ones on the branch output,
  before the residual add: ``models.norm.NormThenAdd``), and one per query and key head before RoPE,
- GeGLU with the tanh GELU (``models.geglu``),
- attention scaled by ``query_pre_attn_scalar ** -0.5``, ``head_dim`` its own key,
- sliding-window layers interleaved with full-attention ones (``layer_types``), the sliding ones with their own RoPE
  base ``rope_local_base_freq`` (``models.layer_rope``), the full ones with ``rope_theta`` and ``rope_scaling``,
- tied embeddings.

LoRA names are Llama's (q_proj ... down_proj, as PEFT writes them for Gemma). config.json is read in
``config/hf_gemma3.py``; logit softcapping (Gemma 2) is refused there. The image-text checkpoints
(``Gemma3ForConditionalGeneration``) build this text model too; ``checkpoints/image_text.py`` maps their file and
adapter names to the ones below.
"""

from __future__ import annotations

from typing import Dict, List

import torch.nn.functional as F

from nemo_customizer.checkpoints.mappings import Replicated, WeightMapping
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama, qwen3
from nemo_customizer.models.geglu import GeGLU
from nemo_customizer.models.llama import HF_MODULE_PREFIX, HF_PROJECTIONS, head_dim  # noqa: F401 (the family's API)
from nemo_customizer.models.spec import LayerOptions

LAYER = LayerOptions(activation=GeGLU, post_norms=True, rope_per_layer_kind=True)
SCALED_EMBEDDINGS = True


def transformer_fields(arch: ArchitectureConfig) -> dict:
    scalar = arch.query_pre_attn_scalar or head_dim(arch)
    return {**llama.transformer_fields(arch), "qk_layernorm": True, "layernorm_zero_centered_gamma": True,
            # The MLP runs LAYER.activation (GeGLU, tanh GELU); mcore only checks that this names a GELU.
            "activation_func": F.gelu, "softmax_scale": scalar ** -0.5}


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    # Qwen3's weights (Llama's + the q/k norms), then the norms on the attention and MLP outputs.
    mappings = qwen3.weight_mappings(arch, layer_numbers, pre_process=pre_process, post_process=post_process)
    for local, layer in enumerate(layer_numbers):
        mc, hf = f"decoder.layers.{local}.", f"model.layers.{layer}."
        mappings[mc + "self_attn_bda.norm.weight"] = Replicated(hf + "post_attention_layernorm.weight")
        mappings[mc + "pre_mlp_layernorm.weight"] = Replicated(hf + "pre_feedforward_layernorm.weight")
        mappings[mc + "mlp_bda.norm.weight"] = Replicated(hf + "post_feedforward_layernorm.weight")
    return mappings
