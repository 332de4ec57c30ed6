"""Gemma 3 (text) ``config.json`` keys beyond Llama's: two RoPE bases, interleaved windows, the attention scale.

transformers 4 writes ``rope_theta`` (full-attention layers), ``rope_local_base_freq`` (sliding layers) and
``rope_scaling`` (full-attention layers only) as top-level keys and ``sliding_window_pattern`` (every n-th layer
attends fully); transformers 5 writes one ``rope_parameters`` dict per layer type and an explicit ``layer_types``.
Both read into the same :class:`ArchitectureConfig` fields. An image-text checkpoint
(``Gemma3ForConditionalGeneration``, ``model_type: gemma3``) nests these keys under ``text_config``, leaving out
those equal to Gemma3TextConfig's defaults: :func:`image_text_config` flattens it first. The keys Gemma 3 shares with
Gemma 2 (the activation, the attention scale, the window, logit softcapping, which Gemma 3 checkpoints set to null)
are read by ``hf_gemma2``. No torch.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError
from .hf_gemma2 import gemma_fields
from .schema import RopeScalingConfig

# Gemma3TextConfig's defaults for keys a config.json may leave out.
_DEFAULTS = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 4096,
             "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
             "attn_logit_softcapping": None, "final_logit_softcapping": None}


# Gemma3TextConfig's size defaults (the same in transformers 4.50 and 5): google/gemma-3-4b-it's text_config names
# only hidden_size, intermediate_size, num_hidden_layers, rope_scaling and sliding_window.
_TEXT_CONFIG_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                         "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                         "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "bos_token_id": 2,
                         "eos_token_id": 1}
# Keys of the top-level (image-text) config that apply to the text model where set: generation stops at its
# eos_token_id list ([1, 106] in gemma-3-4b-it), and transformers 5 ties the output head by its tie_word_embeddings.
_TOP_LEVEL_KEYS = ("architectures", "model_type", "bos_token_id", "eos_token_id", "tie_word_embeddings")


def image_text_config(data: Mapping[str, Any], source: str) -> dict:
    """The text model's config of an image-text config.json, flat as a Gemma3ForCausalLM config.json is: its
    ``text_config`` over Gemma3TextConfig's defaults, with the top level's architectures, model_type, bos/eos ids
    and tie_word_embeddings (transformers 4 ties by ``text_config.tie_word_embeddings``, transformers 5 by the
    top-level key; both default to true). ``vision_config`` is not read: the vision tower is not built."""
    text = data.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError(f"{source}: an image-text config.json ({', '.join(data.get('architectures') or [])}) "
                          "needs a text_config object with the text model's keys; it has none.")
    flat = {**_TEXT_CONFIG_DEFAULTS, **text}
    flat.update({key: data[key] for key in _TOP_LEVEL_KEYS if data.get(key) is not None})
    return flat


def gemma3_fields(data: Mapping[str, Any], source: str) -> dict:
    """The :class:`ArchitectureConfig` fields a Gemma 3 text config.json sets beyond Llama's keys; a ConfigError
    naming any key whose option our layers do not build."""
    shared = gemma_fields(data, source, _DEFAULTS)
    layers = data["num_hidden_layers"]
    types = data.get("layer_types")
    if types is None:
        pattern = data.get("sliding_window_pattern", data.get("_sliding_window_pattern",
                                                                _DEFAULTS["sliding_window_pattern"]))
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    theta, local_theta, scaling = _rope(data, source)
    return dict(shared, rope_theta=float(theta), rope_local_base_freq=float(local_theta), rope_scaling=scaling,
                layer_types=list(types))


def _rope(data: Mapping[str, Any], source: str) -> tuple[float, float, RopeScalingConfig | None]:
    """``(rope_theta, rope_local_base_freq, rope_scaling)``: the full-attention layers' base and scaling, and the
    sliding layers' base (which transformers never scales)."""
    params = data.get("rope_parameters")
    if params is not None and "full_attention" in params:  # transformers 5: one dict per layer type
        full, local = params["full_attention"], params.get("sliding_attention", {})
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_parameters.sliding_attention.rope_type={local['rope_type']!r} is not "
                              "supported (only default).")
        theta, local_theta, scaling = full.get("rope_theta"), local.get("rope_theta"), full
    else:
        theta, local_theta = data.get("rope_theta"), data.get("rope_local_base_freq")
        scaling = data.get("rope_scaling") or {}
    theta = _DEFAULTS["rope_theta"] if theta is None else theta
    local_theta = _DEFAULTS["rope_local_base_freq"] if local_theta is None else local_theta
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, local_theta, None
    if kind != "linear":
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported for Gemma 3 (only linear).")
    return theta, local_theta, RopeScalingConfig(rope_type="linear", factor=float(scaling["factor"]))
