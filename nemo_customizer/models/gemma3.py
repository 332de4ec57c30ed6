"""Gemma 3 (text, ``Gemma3ForCausalLM``): Gemma 2's layer (``models.gemma2``: embeddings scaled by √hidden, four
``(1 + w)`` RMSNorms per layer, GeGLU with the tanh GELU, ``query_pre_attn_scalar``, sliding-window layers interleaved
with full-attention ones (``layer_types``), tied embeddings) with

- an RMSNorm per query and key head before RoPE (Qwen3's, ``qk_layernorm``),
- the sliding ones rotating with their own RoPE base ``rope_local_base_freq`` (``models.layer_rope``), the full ones
  with ``rope_theta`` and ``rope_scaling``,
- logit softcapping left off by its checkpoints (honoured as in Gemma 2 where a config.json sets it).

LoRA names are Llama's (q_proj ... down_proj, as PEFT writes them for Gemma). config.json is read in
``config/hf_gemma3.py``. The image-text checkpoints
(``Gemma3ForConditionalGeneration``) build this text model too; ``checkpoints/image_text.py`` maps their file and
adapter names to the ones below.
"""

from __future__ import annotations

from typing import Dict, List

from nemo_customizer.checkpoints.mappings import WeightMapping
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import gemma2, qwen3
from nemo_customizer.models.geglu import GeGLU
from nemo_customizer.models.llama import HF_MODULE_PREFIX, HF_PROJECTIONS, head_dim  # noqa: F401 (the family's API)
from nemo_customizer.models.spec import LayerOptions

LAYER = LayerOptions(activation=GeGLU, post_norms=True, rope_per_layer_kind=True)
SCALED_EMBEDDINGS = True


def transformer_fields(arch: ArchitectureConfig) -> dict:
    return {**gemma2.transformer_fields(arch), "qk_layernorm": True}


def weight_mappings(
    arch: ArchitectureConfig, layer_numbers: List[int], *, pre_process: bool, post_process: bool
) -> Dict[str, WeightMapping]:
    # Qwen3's weights (Llama's + the q/k norms), then Gemma 2's norms on the attention and MLP outputs.
    mappings = qwen3.weight_mappings(arch, layer_numbers, pre_process=pre_process, post_process=post_process)
    return gemma2.add_sandwich_norms(mappings, layer_numbers)
