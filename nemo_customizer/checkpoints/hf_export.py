"""Write HF weights out as a checkpoint directory that ``transformers`` loads: safetensors, config.json, generation
config and tokenizer, atomically, from the global rank 0.

The weights come from ``models.hf_state.hf_state_dict`` (the model's shards gathered under HF names): this package
knows files and weight mappings, never the model (``models/`` imports ``checkpoints/``, not the reverse).

An image-text checkpoint (Gemma 3 4B and larger) exports as the image-text model it was: the trained text weights
in the source's file layout, the vision tower and projector copied unchanged from the source, and the source's
config.json, so ``transformers`` loads it as ``Gemma3ForConditionalGeneration`` (``checkpoints.image_text``).
Without a source checkpoint (random weights from the model YAML) there is no vision tower to copy: the export is
the text-only architecture (``Gemma3ForCausalLM``), and a warning says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from nemo_customizer.checkpoints.image_text import with_vision_weights
from nemo_customizer.config.families import ARCHITECTURES, family_of
from nemo_customizer.config.schema import ArchitectureConfig

logger = logging.getLogger(__name__)

# Files copied from the base checkpoint so the export is a complete model folder (the processor's files of an
# image-text model among them).
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
               "processor_config.json")


def save_hf_checkpoint(state: Dict[str, torch.Tensor], arch: ArchitectureConfig, directory: str | Path, *,
                       source_dir: Optional[Path], tokenizer=None) -> None:
    """Write an HF model folder atomically (temp dir + rename). Call on the main rank only.

    ``state`` holds the text model's weights under their HF names; an image-text architecture's export adds the
    source's vision weights (see the module docstring)."""
    if family_of(arch.architectures, arch.model_type).image_text:
        if source_dir is not None:
            state = with_vision_weights(state, source_dir)
        else:
            logger.warning("%s: no source checkpoint to copy the vision tower from, so this export is the text model "
                           "alone, a %s (it takes no images)", directory, text_only_architecture(arch).architectures[0])
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config_dict(arch, source_dir), indent=2))
        if source_dir is not None:
            for name in _SIDE_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, staging / name)
        if tokenizer is not None and not (staging / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(str(staging))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def hf_config_dict(arch: ArchitectureConfig, source_dir: Optional[Path] = None) -> dict:
    """The source checkpoint's config.json (authoritative) or one written from the architecture (what
    ``transformers`` builds the same model from; an image-text architecture's text model alone)."""
    if source_dir is not None and (source_dir / "config.json").is_file():
        config = json.loads((source_dir / "config.json").read_text())
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        if "dtype" in config:  # transformers 5's name for it
            config["dtype"] = "float32"
        return config
    if family_of(arch.architectures, arch.model_type).image_text:  # no vision tower to describe: the text model
        arch = text_only_architecture(arch)
    family = family_of(arch.architectures, arch.model_type)
    config = {
        "architectures": list(arch.architectures), "model_type": arch.model_type or family.model_type,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim or arch.hidden_size // arch.num_attention_heads, "vocab_size": arch.vocab_size,
        "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings, "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id,
        "pad_token_id": None,  # not a config default of every family (Phi3Config: 32000, maybe outside the vocabulary)
    }
    if family.qkv_bias:  # biases on q, k, v are the family's layout, not a config key (Qwen2)
        del config["attention_bias"], config["mlp_bias"]
    if family.sliding_window or arch.sliding_window is not None:
        # Explicit null where there is no window: Mistral's config class would assume 4096.
        config["sliding_window"] = arch.sliding_window
    if arch.sliding_window is not None and (arch.layer_types is not None or not family.sliding_window):
        # Every layer's type: Qwen2's class windows only under use_sliding_window and would derive the types from its
        # max_window_layers default. (A Mistral config.json with layer_types loads as Ministral, which is right then.)
        config["use_sliding_window"] = True
        config["layer_types"] = list(arch.layer_types or ["sliding_attention"] * arch.num_hidden_layers)
    if arch.rope_scaling is not None and arch.rope_scaling.rope_type == "longrope":
        s = arch.rope_scaling
        config["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(s.short_factor),
                                  "long_factor": list(s.long_factor)}
        if s.attention_factor is not None:
            config["rope_scaling"]["attention_factor"] = s.attention_factor
        # Phi3Config reads this top-level key (4096 where absent), not the one in the rope dict
        config["original_max_position_embeddings"] = s.original_max_position_embeddings
    elif arch.rope_scaling is not None:
        s = arch.rope_scaling
        config["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            config["rope_scaling"].update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                                          original_max_position_embeddings=s.original_max_position_embeddings)
    if family.module in ("gemma2", "gemma3"):
        for key in ("hidden_act", "mlp_bias", "use_sliding_window"):  # not Gemma2Config's or Gemma3TextConfig's keys
            config.pop(key, None)
        config.update(_gemma_keys(arch, family.module))
    return config


def text_only_architecture(arch: ArchitectureConfig) -> ArchitectureConfig:
    """An image-text architecture's text model as the text-only architecture of its family (Gemma3ForCausalLM)."""
    text = family_of(arch.architectures, arch.model_type).text_architecture
    return dataclasses.replace(arch, architectures=[text], model_type=ARCHITECTURES[text].model_type)


def _gemma_keys(arch: ArchitectureConfig, module: str) -> dict:
    """Gemma2Config's and Gemma3TextConfig's keys beyond Llama's (transformers 4's layout, which transformers 5 also
    reads). Every layer's type is written out: where the key is absent, the config classes derive their own (Gemma 2
    alternates, Gemma 3 attends fully on every 6th layer)."""
    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    if arch.sliding_window is None:
        layer_types = ["full_attention"] * arch.num_hidden_layers
    else:
        layer_types = list(arch.layer_types or ["sliding_attention"] * arch.num_hidden_layers)
    keys = {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": arch.query_pre_attn_scalar or head_dim,
            "sliding_window": arch.sliding_window, "layer_types": layer_types,
            "attn_logit_softcapping": arch.attn_logit_softcapping,
            "final_logit_softcapping": arch.final_logit_softcapping}
    if module == "gemma3":
        keys["rope_local_base_freq"] = arch.rope_local_base_freq or arch.rope_theta
    return keys


def is_export_rank() -> bool:
    """The one process that writes exported files (global rank 0)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
