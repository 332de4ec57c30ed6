"""Write HF weights out as a checkpoint directory that ``transformers`` loads: safetensors, config.json, generation
config and tokenizer, atomically, from the global rank 0.

The weights come from ``models.hf_state.hf_state_dict`` (the model's shards gathered under HF names): this package
knows files and weight mappings, never the model (``models/`` imports ``checkpoints/``, not the reverse).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from nemo_customizer.config.families import family_of
from nemo_customizer.config.schema import ArchitectureConfig

# Files copied from the base checkpoint so the export is a complete model folder.
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja", "chat_template.json")


def save_hf_checkpoint(state: Dict[str, torch.Tensor], arch: ArchitectureConfig, directory: str | Path, *,
                       source_dir: Optional[Path], tokenizer=None) -> None:
    """Write an HF model folder atomically (temp dir + rename). Call on the main rank only."""
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
    ``transformers`` builds the same model from)."""
    if source_dir is not None and (source_dir / "config.json").is_file():
        config = json.loads((source_dir / "config.json").read_text())
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        return config
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
    if family.module == "gemma3":
        for key in ("hidden_act", "mlp_bias", "use_sliding_window"):  # not Gemma3TextConfig's keys
            config.pop(key, None)
        config.update(_gemma3_keys(arch))
    return config


def _gemma3_keys(arch: ArchitectureConfig) -> dict:
    """Gemma3TextConfig's keys beyond Llama's (transformers 4's layout, which transformers 5 also reads); no
    softcapping, which we refuse on import."""
    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": arch.query_pre_attn_scalar or head_dim,
            "rope_local_base_freq": arch.rope_local_base_freq or arch.rope_theta,
            "attn_logit_softcapping": None, "final_logit_softcapping": None}


def is_export_rank() -> bool:
    """The one process that writes exported files (global rank 0)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
