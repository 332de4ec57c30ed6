"""Fold LoRA adapters into base weights, in HF naming (for ``finetuning_type: lora_merged`` exports)."""

from __future__ import annotations

from typing import Dict

import torch

_ADAPTER_PREFIX = "base_model.model."


def merge_lora_into_hf(base: Dict[str, torch.Tensor], adapter: Dict[str, torch.Tensor],
                       scaling: float) -> Dict[str, torch.Tensor]:
    """``W + scaling · B @ A`` for every adapted projection; ``base`` and ``adapter`` as HF / HF-PEFT state dicts."""
    merged = dict(base)
    for key, lora_a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(_ADAPTER_PREFIX).removesuffix(".lora_A.weight")
        lora_b = adapter[f"{_ADAPTER_PREFIX}{module}.lora_B.weight"]
        weight = f"{module}.weight"
        if weight not in merged:
            raise KeyError(f"adapter module {module} has no base weight {weight} to merge into")
        merged[weight] = merged[weight] + scaling * (lora_b.float() @ lora_a.float()).to(merged[weight].dtype)
    return merged
