"""The model families we train, by HF ``architectures`` name (``model_type`` as fallback), without importing them.

This table is the registry: ``models/registry.py`` imports ``nemo_customizer.models.<module>`` for a family, and
the config checks use it to refuse an unsupported checkpoint before any data is read or directory created (no torch
here). A new family is one module in ``models/`` and one line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError


# HF module names LoRA can target (as PEFT writes them), per Megatron linear layer.
SEPARATE_PROJECTIONS: Mapping[str, Tuple[str, ...]] = MappingProxyType({
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
})
FUSED_PROJECTIONS: Mapping[str, Tuple[str, ...]] = MappingProxyType({  # Phi-3: q/k/v and gate/up fused in HF
    "linear_qkv": ("qkv_proj",),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_up_proj",),
    "linear_fc2": ("down_proj",),
})


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
    projections: Mapping[str, Tuple[str, ...]] = field(default_factory=lambda: SEPARATE_PROJECTIONS, hash=False)
    """The HF module names of each Megatron linear (what LoRA ``target_modules`` may name)."""
    sliding_window: bool = False
    """config.json's ``sliding_window`` bounds attention unless null (Mistral, Phi-3, Gemma 3). Other families read
    a window only under ``use_sliding_window: true`` (Qwen2, Qwen3), or never (``windows="none"``: Llama)."""
    absent_window: Optional[int] = 4096
    """The window transformers' config class assumes where config.json has no ``sliding_window`` key (Mistral,
    Qwen2, Qwen3: 4096; Phi-3: none)."""
    windows: str = "per_layer"
    """The sliding windows the family's transformers class runs, and so what an export can carry: ``per_layer``
    (on the layers ``layer_types`` names, or all), ``every_layer`` (one window on every layer or none: Phi-3) or
    ``none`` (Llama: transformers ignores a ``sliding_window`` key)."""
    sandwich_norms: bool = False
    """RMSNorms on the attention and MLP outputs too, before each residual add (Gemma): four per layer, not two."""
    default_lora_targets: Tuple[str, ...] = ("q_proj", "v_proj")
    """What LoRA adapts when ``hyperparameters.lora.target_modules`` is not set: the query and value projections,
    under the family's HF names (Phi-3's are one fused ``qkv_proj``)."""
    text_architecture: Optional[str] = None
    """Set for an image-text architecture (Gemma 3 4B and larger): the text-only architecture of the same text
    model, which is what we build. config.json nests the text model's keys under ``text_config``; its weights sit
    under a language-model prefix and the vision tower is carried over unchanged, never trained
    (``checkpoints.image_text``)."""

    @property
    def image_text(self) -> bool:
        return self.text_architecture is not None


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", "llama", windows="none"),
    "MistralForCausalLM": Family("mistral", "mistral", sliding_window=True),
    "MinistralForCausalLM": Family("mistral", "ministral", sliding_window=True),
    "Qwen2ForCausalLM": Family("qwen2", "qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", "qwen3", qk_norm=True),
    "Phi3ForCausalLM": Family("phi3", "phi3", projections=FUSED_PROJECTIONS, sliding_window=True, absent_window=None,
                              windows="every_layer", default_lora_targets=("qkv_proj",)),  # Phi-3, Phi-3.5, Phi-4
    "Gemma2ForCausalLM": Family("gemma2", "gemma2", sliding_window=True, sandwich_norms=True),
    "Gemma3ForCausalLM": Family("gemma3", "gemma3_text", qk_norm=True, sliding_window=True, sandwich_norms=True),
    # Gemma 3 4B and larger: the text model trains, the vision tower rides along unchanged.
    "Gemma3ForConditionalGeneration": Family("gemma3", "gemma3", qk_norm=True, sliding_window=True,
                                             sandwich_norms=True,
                                             text_architecture="Gemma3ForCausalLM"),
}

# Architectures we know but do not build, with what to use instead (appended to the unsupported-architecture error).
HINTS: Mapping[str, str] = MappingProxyType({})


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
    hints = "".join(f" {HINTS[name]}." for name in architectures if name in HINTS)
    raise ConfigError(f"{source}: architecture {named}{of_type} is not supported; supported architectures: "
                      f"{', '.join(sorted(ARCHITECTURES))}.{hints}")


def usual_model_type(architectures: Sequence[str]) -> Optional[str]:
    """The ``model_type`` of the first supported name in ``architectures`` (None when none is supported)."""
    return next((ARCHITECTURES[name].model_type for name in architectures if name in ARCHITECTURES), None)


def lora_target_names(family: Family) -> List[str]:
    """The HF projection names LoRA may target in this family (``target_modules`` may also name the Megatron
    linears, each standing for all its projections)."""
    return [name for names in family.projections.values() for name in names]


def lora_targets(target_modules: Optional[Sequence[str]], architectures: Sequence[str],
                 model_type: Optional[str] = None) -> List[str]:
    """``hyperparameters.lora.target_modules`` as given, or the family's default where it is None (not set)."""
    if target_modules is not None:
        return list(target_modules)
    return list(family_of(architectures, model_type).default_lora_targets)


def window_families() -> str:
    """The supported architectures whose transformers class runs a sliding window (for error messages)."""
    return ", ".join(sorted(name for name, family in ARCHITECTURES.items() if family.windows != "none"))


def check_lora_targets(target_modules: Optional[Sequence[str]], architectures: Sequence[str],
                       model_type: Optional[str] = None, *,
                       source: str = "hyperparameters.lora.target_modules") -> None:
    """A ConfigError naming the first module this family does not have, and the ones it has (None: the family's
    default, which it has)."""
    family = family_of(architectures, model_type)
    hf_names = lora_target_names(family)
    for name in target_modules or ():
        if name not in hf_names and name not in family.projections:
            raise ConfigError(f"{source} has unknown module {name!r} for {', '.join(architectures) or model_type}; "
                              f"use its HF names ({', '.join(hf_names)}) or Megatron names "
                              f"({', '.join(family.projections)}).")
