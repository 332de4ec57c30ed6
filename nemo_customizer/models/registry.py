"""Model families by HF ``architectures`` name."""

from __future__ import annotations

from types import ModuleType

from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.models import llama

FAMILIES: dict[str, ModuleType] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,  # same weights and layer layout (no sliding window in the models we ship)
}


def family_for(arch: ArchitectureConfig) -> ModuleType:
    """The family module (config table + weight mappings) for this architecture."""
    for name in arch.architectures:
        if name in FAMILIES:
            return FAMILIES[name]
    raise ValueError(
        f"unsupported architecture {list(arch.architectures)}; supported: {sorted(FAMILIES)}"
    )
