"""The shipped model configs, and those in a user's config folders, listed like NeMo Customizer's
``GET /v1/customization/configs``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .compose import JOB_FILE_SUFFIX, available_models, compose_config, config_search
from .families import family_of
from .schema import ArchitectureConfig, ModelConfig

TEST_MODEL_SUFFIX = "-test"  # conf/model/*-test.yaml are unit-test models, left out of configs()


def model_configs(include_test_models: bool = False, config_dirs: Sequence[str | Path] = ()) -> list[ModelConfig]:
    """Each shipped ``conf/model/*.yaml`` and each ``model/*.yaml`` in ``config_dirs``, composed and typed."""
    return [model for model, _ in _listed(include_test_models, config_dirs)]


def configs(include_test_models: bool = False,
            config_dir: str | Path | Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """One dict per customizable model: name, max_seq_length, default parallelism, packing, parameter count.

    ``config_dir`` (one folder or several, as ``--config-dir`` takes them) adds the models in each folder's
    ``model/``; their dicts also hold ``config_dir``, the folder they come from (one there takes the place of a
    shipped model of the same name, as it does in a job)."""
    dirs = [] if config_dir is None else [config_dir] if isinstance(config_dir, (str, Path)) else list(config_dir)
    return [
        {
            "name": model.name,
            "max_seq_length": model.max_seq_length,
            "tensor_parallel_size": model.tensor_parallel_size,
            "use_sequence_parallel": model.use_sequence_parallel,
            "sequence_packing_supported": model.sequence_packing_supported,
            "num_parameters": None if model.architecture_from_checkpoint else num_parameters(model.architecture),
            **({"config_dir": str(source)} if source else {}),
        }
        for model, source in _listed(include_test_models, dirs)
    ]


def _listed(include_test_models: bool, config_dirs: Sequence[str | Path]) -> list[tuple[ModelConfig, Optional[Path]]]:
    """Each model config with the user folder it comes from (None: shipped)."""
    search = config_search(config_dirs=config_dirs)  # checked: each folder exists
    names = [n for n in available_models(search.config_dirs)
             if include_test_models or not n.endswith(TEST_MODEL_SUFFIX)]
    return [(compose_config([f"model={name}"], search=search).model, _source(name, search.config_dirs))
            for name in names]


def _source(name: str, config_dirs: Sequence[Path]) -> Optional[Path]:
    """The first of ``config_dirs`` holding ``model/NAME.yaml`` (Hydra's search order), or None."""
    return next((d for d in config_dirs if (d / "model" / f"{name}{JOB_FILE_SUFFIX}").is_file()), None)


def num_parameters(arch: ArchitectureConfig) -> int:
    """Parameter count of the decoder (embeddings, attention with the family's q/k/v biases and q/k norms, gated
    MLP, RMSNorms, untied head)."""
    family = family_of(arch.architectures, arch.model_type)
    hidden, heads, kv_heads = arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads
    head_dim = arch.head_dim or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o + k, v
    if family.qkv_bias:
        attention += head_dim * (heads + 2 * kv_heads)
    if family.qk_norm:
        attention += 2 * head_dim
    mlp = 3 * hidden * arch.intermediate_size  # gate, up, down
    layer = attention + mlp + (4 if family.sandwich_norms else 2) * hidden  # + the layer's norms
    embeddings = arch.vocab_size * hidden * (1 if arch.tie_word_embeddings else 2)
    return arch.num_hidden_layers * layer + embeddings + hidden  # + final norm
