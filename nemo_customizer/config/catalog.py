"""The shipped model configs, listed like NeMo Customizer's ``GET /v1/customization/configs``."""

from __future__ import annotations

from typing import Any

from .compose import available_models, compose_config
from .families import family_of
from .schema import ArchitectureConfig, ModelConfig

TEST_MODEL_SUFFIX = "-test"  # conf/model/*-test.yaml are unit-test models, left out of configs()


def model_configs(include_test_models: bool = False) -> list[ModelConfig]:
    """Each shipped ``conf/model/*.yaml``, composed and typed."""
    names = [n for n in available_models() if include_test_models or not n.endswith(TEST_MODEL_SUFFIX)]
    return [compose_config([f"model={name}"]).model for name in names]


def configs(include_test_models: bool = False) -> list[dict[str, Any]]:
    """One dict per customizable model: name, max_seq_length, default parallelism, packing, parameter count."""
    return [
        {
            "name": model.name,
            "max_seq_length": model.max_seq_length,
            "tensor_parallel_size": model.tensor_parallel_size,
            "use_sequence_parallel": model.use_sequence_parallel,
            "sequence_packing_supported": model.sequence_packing_supported,
            "num_parameters": None if model.architecture_from_checkpoint else num_parameters(model.architecture),
        }
        for model in model_configs(include_test_models)
    ]


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
