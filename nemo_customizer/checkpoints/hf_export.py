"""Write a (TP/PP-sharded) Megatron model back out as an HF checkpoint directory that ``transformers`` loads.

Shards are gathered with the same weight mappings that loaded them (``mapping.export`` is the inverse of
``mapping.load_shard``), then the global rank 0 writes safetensors, config.json, generation config and tokenizer.
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

from nemo_customizer.checkpoints.mappings import Replicated
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.distributed.collectives import gather_pipeline_objects, gather_tensor_parallel_shards
from nemo_customizer.models.gpt import stage_layer_numbers, unwrap
from nemo_customizer.models.registry import family_for

# Files copied from the base checkpoint so the export is a complete model folder.
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja", "chat_template.json")


@torch.no_grad()
def hf_state_dict(model: torch.nn.Module, arch: ArchitectureConfig) -> Dict[str, torch.Tensor]:
    """The whole model's base weights under HF names, fp32 on CPU, on every rank (collective)."""
    gpt = unwrap(model)
    mappings = family_for(arch).weight_mappings(arch, stage_layer_numbers(gpt), pre_process=gpt.pre_process,
                                                post_process=gpt.post_process)
    params = _base_parameters(gpt)
    local: Dict[str, torch.Tensor] = {}
    for name, mapping in mappings.items():
        if name not in params:
            continue  # output_layer.weight when it is the (tied) embedding on this stage
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # HF ties lm_head to embed_tokens; the first stage exports it
        shard = params[name].detach()
        shards = [shard] if isinstance(mapping, Replicated) else gather_tensor_parallel_shards(shard)
        for hf_name, tensor in mapping.export([s.float().cpu() for s in shards]).items():
            local[hf_name] = tensor.contiguous()
    merged: Dict[str, torch.Tensor] = {}
    for stage in gather_pipeline_objects(local):
        merged.update(stage)
    return merged


def _base_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Parameters of the model without LoRA wrappers' adapter weights, under the unwrapped base names."""
    out = {}
    for name, param in model.named_parameters():
        if ".adapters." in name:
            continue
        out[name.replace(".base.", ".")] = param
    return out


def save_hf_checkpoint(state: Dict[str, torch.Tensor], arch: ArchitectureConfig, directory: str | Path, *,
                       source_dir: Optional[Path], tokenizer=None) -> None:
    """Write an HF model folder atomically (temp dir + rename). Call on the main rank only."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(_hf_config(arch, source_dir), indent=2))
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


def _hf_config(arch: ArchitectureConfig, source_dir: Optional[Path]) -> dict:
    """The source checkpoint's config.json (authoritative) or one written from the architecture."""
    if source_dir is not None and (source_dir / "config.json").is_file():
        config = json.loads((source_dir / "config.json").read_text())
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        return config
    config = {
        "architectures": list(arch.architectures), "model_type": "llama", "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim or arch.hidden_size // arch.num_attention_heads, "vocab_size": arch.vocab_size,
        "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings, "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id,
    }
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        config["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                  "high_freq_factor": s.high_freq_factor,
                                  "original_max_position_embeddings": s.original_max_position_embeddings}
    return config


def is_export_rank() -> bool:
    """The one process that writes exported files (global rank 0)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
