"""Gemma 2 (``Gemma2ForCausalLM``): the Llama layer with

- embeddings scaled by √hidden (``SCALED_EMBEDDINGS``, in ``models.gpt``),
- RMSNorms that scale by ``1 + weight`` in fp32 (mcore's ``layernorm_zero_centered_gamma``, ``models.norm``),
  four per layer: before and after attention, before and after the MLP (the "after" ones on the branch output,
  before the residual add: ``models.norm.NormThenAdd``),
- GeGLU with the tanh GELU (``models.geglu``),
- attention scaled by ``query_pre_attn_scalar ** -0.5``, ``head_dim`` its own key,
- sliding-window layers alternating with full-attention ones (``layer_types``), all with one RoPE base,
- attention-logit softcapping (``attn_logit_softcapping``, in ``models.attention.CoreAttention``) and final-logit
  softcapping (``final_logit_softcapping``, on the output layer in ``models.gpt`` and in the loss head),
- tied embeddings.

LoRA names are Llama's (q_proj ... down_proj, as PEFT writes them for Gemma). config.json is read in
``config/hf_gemma2.py``. Gemma 3 (``models.gemma3``) is this layer plus q/k norms and a RoPE base of its own for the
sliding-window layers.
"""

from __future__ import annotations

from typing import Dict, List

import torch.nn.functional as F

from nemo_customizer.checkpoints.mappings import Replicated, WeightMapping
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama
from nemo_customizer.models.geglu import GeGLU
from nemo_customizer.models.llama import HF_MODULE_PREFIX, HF_PROJECTIONS, head_dim  # noqa: F401 (the family's API)
from nemo_customizer.models.spec import LayerOptions

LAYER = LayerOptions(activation=GeGLU, post_norms=True)
SCALED_EMBEDDINGS = True


def transformer_fields(arch: ArchitectureConfig) -> dict:
    scalar = arch.query_pre_attn_scalar or head_dim(arch)
    return {**llama.transformer_fields(arch), "layernorm_zero_centered_gamma": True,
            # The MLP runs LAYER.activation (GeGLU, tanh GELU); mcore only checks that this names a GELU.
            "activation_func": F.gelu, "softmax_scale": scalar ** -0.5}


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    mappings = llama.weight_mappings(arch, layer_numbers, pre_process=pre_process, post_process=post_process)
    return add_sandwich_norms(mappings, layer_numbers)


def add_sandwich_norms(mappings: Dict[str, WeightMapping], layer_numbers: List[int]) -> Dict[str, WeightMapping]:
    """``mappings`` with Gemma's norms on the attention and MLP outputs, and its pre-MLP norm under HF's name
    (Llama's ``post_attention_layernorm`` is the pre-MLP norm; Gemma's is the norm on the attention output)."""
    for local, layer in enumerate(layer_numbers):
        mc, hf = f"decoder.layers.{local}.", f"model.layers.{layer}."
        mappings[mc + "self_attn_bda.norm.weight"] = Replicated(hf + "post_attention_layernorm.weight")
        mappings[mc + "pre_mlp_layernorm.weight"] = Replicated(hf + "pre_feedforward_layernorm.weight")
        mappings[mc + "mlp_bda.norm.weight"] = Replicated(hf + "post_feedforward_layernorm.weight")
    return mappings
