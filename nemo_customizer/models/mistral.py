"""Mistral and Ministral: the Llama layer, with sliding-window attention where config.json sets ``sliding_window``
(Mistral-7B v0.1: 4096; v0.2 and v0.3: null) and, for Ministral, per-layer ``layer_types``.

The window is an attention option, not a weight: ``llama.window_fields`` puts it into mcore's ``TransformerConfig``
for every family, and ``models.attention.CoreAttention`` honours it in padded, packed and KV-cache attention.
"""

from __future__ import annotations

from nemo_customizer.models.llama import (  # noqa: F401 (the family's API)
    HF_MODULE_PREFIX,
    HF_PROJECTIONS,
    head_dim,
    transformer_fields,
    weight_mappings,
)
