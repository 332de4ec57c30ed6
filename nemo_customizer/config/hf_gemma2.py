"""Gemma 2 ``config.json`` keys beyond Llama's, and the reading Gemma 3 shares (``hf_gemma3``): the activation, the
attention scale, the sliding window, logit softcapping, tied embeddings.

Gemma 2 has one RoPE base for every layer (``rope_theta``, read as Llama's) and alternates sliding-window and
full-attention layers; a config.json without ``layer_types`` gets Gemma2Config's: windowed on even layer indices
(0, 2, 4, ...), full on odd ones. No torch.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError

# Gemma2Config's defaults for keys a config.json may leave out (null softcapping stays null: no cap).
GEMMA2_DEFAULTS = {"sliding_window": 4096, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
SOFTCAPPING_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")


def gemma2_fields(data: Mapping[str, Any], source: str) -> dict:
    """The :class:`ArchitectureConfig` fields a Gemma 2 config.json sets beyond Llama's keys (RoPE and the rest are
    read as Llama's); a ConfigError naming any key whose option our layers do not build."""
    types = data.get("layer_types")
    if types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(data["num_hidden_layers"])]
    return dict(gemma_fields(data, source, GEMMA2_DEFAULTS), layer_types=list(types))


def gemma_fields(data: Mapping[str, Any], source: str, defaults: Mapping[str, Any]) -> dict:
    """What Gemma 2 and Gemma 3 text configs share, with the family's ``defaults`` for absent keys: the window (its
    layer types are the family's), ``query_pre_attn_scalar``, both softcaps, tied embeddings."""
    activation = data.get("hidden_activation", defaults["hidden_activation"])
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: hidden_activation={activation!r} is not supported (only gelu_pytorch_tanh).")
    if data.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported.")
    caps = {key: data.get(key, defaults[key]) for key in SOFTCAPPING_KEYS}
    for key, cap in caps.items():
        if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
            raise ConfigError(f"{source}: {key}={cap} must be a positive number, or null for no cap.")
    return dict(sliding_window=data.get("sliding_window", defaults["sliding_window"]),
                query_pre_attn_scalar=int(data.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"])),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
                **{key: None if cap is None else float(cap) for key, cap in caps.items()})
