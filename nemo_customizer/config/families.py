"""The model families we train, by HF ``architectures`` name (``model_type`` as fallback), without importing them.

This table is the registry: ``models/registry.py`` imports ``nemo_customizer.models.<module>`` for a family, and
the config checks use it to refuse an unsupported checkpoint before any data is read or directory created (no torch
here). A new family is one module in ``models/`` and one line below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Family:
    """What the config layer needs to know of a family; everything else is in its module in ``models/``."""

    module: str
    """The family's module in ``nemo_customizer/models/``."""
    model_type: str
    """HF ``model_type`` written into an exported config.json."""
    qkv_bias: bool = False
    """Every checkpoint has biases on q, k and v (Qwen2: config.json has no key for it)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    sliding_window: bool = False
    """config.json's ``sliding_window`` bounds attention unless null (Mistral; transformers assumes 4096 where the
    key is absent). Other families read a window only under ``use_sliding_window: true`` (Qwen2)."""


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", "llama"),
    "MistralForCausalLM": Family("mistral", "mistral", sliding_window=True),
    "MinistralForCausalLM": Family("mistral", "ministral", sliding_window=True),
    "Qwen2ForCausalLM": Family("qwen2", "qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", "qwen3", qk_norm=True),
}


def family_of(architectures: Sequence[str], model_type: Optional[str] = None, *,
              source: str = "model.architecture") -> Family:
    """The family of the first supported name in ``architectures``, else of ``model_type``; a ConfigError naming
    the architecture and listing the supported ones when neither is known."""
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    for family in ARCHITECTURES.values():
        if model_type is not None and family.model_type == model_type:
            return family
    named = ", ".join(architectures) or "(none)"
    of_type = f" (model_type {model_type!r})" if model_type else ""
    raise ConfigError(f"{source}: architecture {named}{of_type} is not supported; supported architectures: "
                      f"{', '.join(sorted(ARCHITECTURES))}.")


def usual_model_type(architectures: Sequence[str]) -> Optional[str]:
    """The ``model_type`` of the first supported name in ``architectures`` (None when none is supported)."""
    return next((ARCHITECTURES[name].model_type for name in architectures if name in ARCHITECTURES), None)
