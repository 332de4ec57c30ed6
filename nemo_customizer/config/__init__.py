"""Typed configuration: schema, Hydra composition, validation, HF config.json reading, model catalog.

Nothing here imports torch or megatron, so a config is checked before any heavy import.
"""

from .catalog import configs, model_configs, num_parameters
from .compose import (
    ConfigSearch,
    available_models,
    compose_config,
    conf_dir,
    config_from_file,
    config_from_kwargs,
    config_search,
)
from .errors import ConfigError, ConfigWarning
from .hf_config import architecture_from_hf, merge_checkpoint_architecture, read_hf_config
from .schema import (
    ArchitectureConfig,
    Config,
    DatasetConfig,
    DpoConfig,
    EarlyStoppingConfig,
    HyperparametersConfig,
    LoraConfig,
    ModelConfig,
    RopeScalingConfig,
    ServingConfig,
)
from .validate import check_batch_layout, model_source, validate_config, validate_serving

__all__ = [
    "ArchitectureConfig", "Config", "ConfigError", "ConfigSearch", "ConfigWarning", "DatasetConfig", "DpoConfig",
    "EarlyStoppingConfig",
    "HyperparametersConfig", "LoraConfig", "ModelConfig", "RopeScalingConfig", "ServingConfig", "architecture_from_hf",
    "available_models", "check_batch_layout", "compose_config", "conf_dir", "config_from_file", "config_from_kwargs",
    "config_search", "configs", "merge_checkpoint_architecture", "model_configs", "model_source", "num_parameters", "read_hf_config",
    "validate_config", "validate_serving",
]
