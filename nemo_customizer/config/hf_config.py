"""Read a checkpoint's HF ``config.json`` into :class:`ArchitectureConfig` and reconcile it with the model YAML.

The checkpoint is authoritative. A model YAML describes its family's real checkpoints, so any difference means the
wrong model config was picked; it is an error naming the key and both values. No torch, no megatron.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .families import Family, family_of, usual_model_type
from .hf_gemma2 import gemma2_fields
from .hf_gemma3 import gemma3_fields, image_text_config
from .schema import ArchitectureConfig, ModelConfig, RopeScalingConfig

# transformers' config defaults for keys a config.json may leave out.
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                "tie_word_embeddings": False, "max_window_layers": 28}
_REQUIRED = ("architectures", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
             "vocab_size")
_SHOWN_CONFLICTS = 3
_PHI3_ORIGINAL_CONTEXT = 4096  # Phi3Config's original_max_position_embeddings where config.json has none
_LONGROPE_TYPES = ("longrope", "su")  # Phi3Config reads the older name "su" as longrope
# Families whose config.json has keys of their own, by family module: the reader of those keys. Gemma 3 reads its own
# RoPE (two bases); Gemma 2 and Gemma 3 read their own window layout.
_FAMILY_KEYS = {"gemma2": gemma2_fields, "gemma3": gemma3_fields}


def read_hf_config(path: str | os.PathLike) -> ArchitectureConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    file = Path(path)
    if file.suffix != ".json":  # a checkpoint directory
        file = file / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file} not found: model.checkpoint must be an HF checkpoint directory with config.json.")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}.") from None
    return architecture_from_hf(data, source=str(file))


def architecture_from_hf(data: Mapping[str, Any], source: str = "config.json") -> ArchitectureConfig:
    """Map HF config keys to :class:`ArchitectureConfig` (transformers 4 and 5 rope layouts; an image-text model's
    ``text_config``)."""
    if "architectures" in data:  # an unsupported architecture is named first
        if family_of(data["architectures"], data.get("model_type"), source=source).image_text:
            data = image_text_config(data, source)
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}; is it a causal LM config of a supported family?")
    family = family_of(data["architectures"], data.get("model_type"), source=source)
    reader = _FAMILY_KEYS.get(family.module)
    _refuse_unsupported_options(data, source, reads_hidden_act=reader is None)
    if family.module == "phi3":
        _refuse_unsupported_phi3_options(data, source)
    family_fields = reader(data, source) if reader is not None else {}
    if "rope_theta" in family_fields:
        rope_theta, rope_scaling = family_fields.pop("rope_theta"), family_fields.pop("rope_scaling")
    else:
        rope_theta, rope_scaling = _rope(data, source, phi3=family.module == "phi3")
    if "layer_types" in family_fields:
        sliding_window, layer_types = normalize_windows(family_fields.pop("sliding_window"),
                                                        family_fields.pop("layer_types"))
    else:
        sliding_window, layer_types = _windows(data, family, source)
    eos = data.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else None
    heads = data["num_attention_heads"]
    return ArchitectureConfig(
        architectures=list(data["architectures"]),
        model_type=data.get("model_type"),
        num_hidden_layers=data["num_hidden_layers"],
        hidden_size=data["hidden_size"],
        num_attention_heads=heads,
        num_key_value_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim"),
        intermediate_size=data["intermediate_size"],
        vocab_size=data["vocab_size"],
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(data.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"])),
        tie_word_embeddings=bool(family_fields.pop("tie_word_embeddings", data.get(
            "tie_word_embeddings", _HF_DEFAULTS["tie_word_embeddings"]))),
        max_position_embeddings=data.get("max_position_embeddings", _HF_DEFAULTS["max_position_embeddings"]),
        sliding_window=sliding_window,
        layer_types=layer_types,
        bos_token_id=data.get("bos_token_id"),
        eos_token_id=eos_ids[0] if eos_ids else eos,
        eos_token_ids=eos_ids if eos_ids and len(eos_ids) > 1 else None,
        **family_fields,
    )


def _refuse_unsupported_options(data: Mapping[str, Any], source: str, reads_hidden_act: bool = True) -> None:
    """Options of the supported families that our layers do not build: an error naming the key, not a model whose
    logits silently differ from the checkpoint's. ``reads_hidden_act``: the family's MLP follows ``hidden_act``
    (Gemma's follows ``hidden_activation``, checked by ``hf_gemma2``; its config.json may carry both)."""
    if data.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true (biases on q, k, v and o_proj) is not supported.")
    if data.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported.")
    if reads_hidden_act and data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={data['hidden_act']!r} is not supported (only silu).")


def _refuse_unsupported_phi3_options(data: Mapping[str, Any], source: str) -> None:
    """Phi3Config keys our layers do not build (its ``rope_scaling`` types are checked by :func:`_rope`)."""
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor={partial} (RoPE on part of each head, as in Phi-4-mini) "
                          "is not supported; only 1.0.")


def _windows(data: Mapping[str, Any], family: Family, source: str) -> tuple[int | None, list[str] | None]:
    """``(sliding_window, layer_types)`` as transformers builds the model: Mistral's and Phi-3's ``sliding_window``
    (Mistral's default where absent), Qwen2's ``use_sliding_window`` switch and ``max_window_layers`` (layers from
    that index on are windowed), or explicit ``layer_types``; Llama never has one. Normalized so that equal models
    compare equal: no window where no layer has one, and ``layer_types`` only where some layer attends fully."""
    if family.windows == "none":  # LlamaForCausalLM ignores the keys, so the model has no window
        return None, None
    per_layer = family.windows == "per_layer"  # else Phi3Config: no switch, no layer types; its window binds if set
    on = bool(data["use_sliding_window"]) if per_layer and "use_sliding_window" in data else family.sliding_window
    window = data.get("sliding_window", family.absent_window) if on else None
    if window is None:
        return None, None
    layers = data["num_hidden_layers"]
    types = data.get("layer_types") if per_layer else None
    if types is None and per_layer and "use_sliding_window" in data:  # Qwen2/Qwen3's config classes default to 28
        first = data.get("max_window_layers", _HF_DEFAULTS["max_window_layers"])
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if types is not None and (len(types) != layers or set(types) - {"sliding_attention", "full_attention"}):
        raise ConfigError(f"{source}: layer_types must name sliding_attention or full_attention for each of the "
                          f"{layers} layers; got {types}.")
    return normalize_windows(int(window), types)


def normalize_windows(window: int | None, types: list[str] | None) -> tuple[int | None, list[str] | None]:
    """The window and layer types with the implied spelled out the one way: no window when no layer uses it, no
    layer list when every layer does."""
    if window is None or (types is not None and "sliding_attention" not in types):
        return None, None
    if types is None or all(kind == "sliding_attention" for kind in types):
        return window, None
    return window, list(types)


def _rope(data: Mapping[str, Any], source: str, *, phi3: bool = False) -> tuple[float, RopeScalingConfig | None]:
    """``rope_theta`` + ``rope_scaling`` (transformers 4) or one ``rope_parameters`` dict (transformers 5).
    ``phi3``: the scaling is longrope, the only kind Phi3Config accepts."""
    params = data.get("rope_parameters")
    if params is not None:
        theta, scaling = params.get("rope_theta", data.get("rope_theta")), params
    else:
        theta, scaling = data.get("rope_theta"), data.get("rope_scaling")
    theta = _HF_DEFAULTS["rope_theta"] if theta is None else theta
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if phi3 and kind in _LONGROPE_TYPES:
        return theta, _longrope(data, scaling, source)
    if kind != "llama3" or phi3:
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported "
                          f"({'Phi-3: only longrope' if phi3 else 'only llama3'}).")
    fields = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    return theta, RopeScalingConfig(rope_type="llama3", **{k: scaling[k] for k in fields if k in scaling})


def _longrope(data: Mapping[str, Any], scaling: Mapping[str, Any], source: str) -> RopeScalingConfig:
    """Phi-3's longrope as Phi3Config reads it: the top-level ``original_max_position_embeddings`` (4096 where
    absent) wins over the one in the rope dict; an explicit ``factor`` only sets the default attention factor."""
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or not all(isinstance(x, (int, float)) for x in factors):
            raise ConfigError(f"{source}: rope_scaling.{key} must be a list of numbers for longrope; got {factors!r}.")
    original = int(data.get("original_max_position_embeddings", _PHI3_ORIGINAL_CONTEXT))
    attention = scaling.get("attention_factor")
    if attention is None and scaling.get("factor") is not None:
        attention = longrope_attention_factor(float(scaling["factor"]), original)
    return RopeScalingConfig(rope_type="longrope", original_max_position_embeddings=original,
                             short_factor=[float(x) for x in scaling["short_factor"]],
                             long_factor=[float(x) for x in scaling["long_factor"]],
                             attention_factor=None if attention is None else float(attention))


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """transformers' default longrope attention factor for a context extended ``factor`` times."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def longrope_attention_scale(arch: ArchitectureConfig) -> float:
    """What longrope multiplies cos and sin by for ``arch`` (1 without longrope)."""
    scaling = arch.rope_scaling
    if scaling is None or scaling.rope_type != "longrope":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    original = scaling.original_max_position_embeddings
    return longrope_attention_factor(arch.max_position_embeddings / original, original)


def merge_checkpoint_architecture(model: ModelConfig, checkpoint_arch: ArchitectureConfig,
                                  source: str = "config.json") -> ModelConfig:
    """Return ``model`` with the checkpoint's architecture, after checking the YAML agrees with it.

    Raises ConfigError listing every key whose YAML value differs from ``source`` (the checkpoint's config.json).
    """
    ours, theirs = _comparable(model.architecture), _comparable(checkpoint_arch)
    conflicts = [f"model.architecture.{key} is {_brief(ours[key])} in the model YAML but {_brief(theirs[key])} in "
                 "the checkpoint" for key in ours if not _same(ours[key], theirs[key])]
    if conflicts:
        shown = "; ".join(conflicts[:_SHOWN_CONFLICTS])
        more = f" (and {len(conflicts) - _SHOWN_CONFLICTS} more)" if len(conflicts) > _SHOWN_CONFLICTS else ""
        raise ConfigError(f"{source} does not match model {model.name!r}: {shown}{more}; the checkpoint is "
                          f"authoritative, so {_pick_model(checkpoint_arch)}")
    return dataclasses.replace(model, architecture=checkpoint_arch)


def _comparable(arch: ArchitectureConfig) -> dict[str, Any]:
    """Fields with implied defaults spelled out, so that e.g. head_dim=None equals hidden/heads."""
    values = dataclasses.asdict(arch)
    if values["model_type"] is None:
        values["model_type"] = usual_model_type(arch.architectures)
    if values["head_dim"] is None:
        values["head_dim"] = arch.hidden_size // arch.num_attention_heads
    values["sliding_window"], values["layer_types"] = normalize_windows(arch.sliding_window, arch.layer_types)
    if values["eos_token_ids"] is None:
        values["eos_token_ids"] = None if arch.eos_token_id is None else [arch.eos_token_id]
    return values


def _brief(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut short (longrope's factor lists would fill the screen)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        # float32 round trips (GGUF stores rms_norm_eps=1e-5 as 9.99999974e-06) are the same value
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _pick_model(arch: ArchitectureConfig) -> str:
    """Advice for a mismatch: the shipped model config matching this checkpoint, if one does."""
    from .catalog import model_configs

    target = _comparable(arch)
    for model in model_configs():
        ours = _comparable(model.architecture)
        if all(_same(ours[key], target[key]) for key in ours):
            return f"use model={model.name} for this checkpoint."
    return ("use model=hf, which takes the whole architecture from config.json, or add a conf/model/<name>.yaml "
            "with the values of its config.json.")
