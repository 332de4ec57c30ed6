"""The family module of an architecture: ``config/families.py`` names them (torch-free, so config checks can refuse
an unsupported checkpoint early); this imports the module, which holds the config table and weight mappings."""

from __future__ import annotations

import importlib
from types import ModuleType

from nemo_customizer.config.families import family_of
from nemo_customizer.config.schema import ArchitectureConfig


def family_for(arch: ArchitectureConfig) -> ModuleType:
    """The family module (TransformerConfig fields, weight mappings, LoRA names) for this architecture; a
    ConfigError naming the architecture and listing the supported ones when none is."""
    return importlib.import_module(f"nemo_customizer.models.{family_of(arch.architectures, arch.model_type).module}")
