"""HF PEFT adapter files ↔ our LoRA modules (gathered over tensor and pipeline parallel ranks).

``adapter_model.safetensors`` uses HF module names
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``), so ``peft`` and vLLM load it unchanged.
An image-text checkpoint's adapter (Gemma 3 4B and larger) names the image-text model's modules
(``base_model.model.model.language_model.layers.N...``), with a ``target_modules`` expression that leaves the vision
tower's same-named projections alone (``checkpoints.image_text``); reading an adapter accepts both namings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from nemo_customizer.checkpoints.image_text import (image_text_adapter_key, language_model_targets,
                                                    projections_of_targets, text_adapter_key)
from nemo_customizer.config.families import family_of
from nemo_customizer.config.schema import ArchitectureConfig, LoraConfig
from nemo_customizer.distributed.collectives import gather_pipeline_objects, gather_tensor_parallel
from nemo_customizer.peft.lora import ColumnParallelLoRA, lora_modules

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The HF module holding each Megatron linear's projections (the same in every family we build).
HF_PARENT_MODULE = {"linear_qkv": "self_attn", "linear_proj": "self_attn", "linear_fc1": "mlp", "linear_fc2": "mlp"}


def _hf_key(layer_index: int, linear: str, projection: str, matrix: str) -> str:
    """The PEFT tensor name of one LoRA matrix: ``projection`` (the family's HF name) inside ``linear``."""
    return f"base_model.model.model.layers.{layer_index}.{HF_PARENT_MODULE[linear]}.{projection}.{matrix}.weight"


def _linear(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _shard_dims(module) -> tuple[int | None, int | None]:
    """TP shard dim of (lora_A, lora_B): column-parallel shards B's rows, row-parallel shards A's columns."""
    return (None, 0) if isinstance(module, ColumnParallelLoRA) else (1, None)


def _layer_index(module_name: str, model: torch.nn.Module) -> int:
    local = int(module_name.split("decoder.layers.")[1].split(".")[0])
    return model.decoder.layers[local].layer_number - 1


def adapter_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The full (unsharded) adapter weights of the whole model under HF PEFT names, on every rank (fp32, CPU)."""
    local: Dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        layer_index, linear = _layer_index(name, model), _linear(name)
        a_dim, b_dim = _shard_dims(module)
        for projection, pair in module.adapters.items():
            a = pair.lora_A.detach() if a_dim is None else gather_tensor_parallel(pair.lora_A.detach(), a_dim)
            b = pair.lora_B.detach() if b_dim is None else gather_tensor_parallel(pair.lora_B.detach(), b_dim)
            if isinstance(module, ColumnParallelLoRA):  # a fused HF projection's rows in HF's order
                b = module.slice(projection).rows_to_hf(b)
            local[_hf_key(layer_index, linear, projection, "lora_A")] = a.float().cpu().contiguous()
            local[_hf_key(layer_index, linear, projection, "lora_B")] = b.float().cpu().contiguous()
    merged: Dict[str, torch.Tensor] = {}
    for stage in gather_pipeline_objects(local):
        merged.update(stage)
    return merged


def peft_adapter_config(lora: LoraConfig, base_model: str, projections, *, image_text: bool = False) -> dict:
    """adapter_config.json; ``image_text``: ``target_modules`` names only the language model's ``projections``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.adapter_dim,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.adapter_dropout,
        "target_modules": language_model_targets(projections) if image_text else sorted(projections),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


def save_peft_adapter(model: torch.nn.Module, lora: LoraConfig, directory: str | Path, base_model: str, *,
                      architecture: ArchitectureConfig | None = None) -> None:
    """Write the adapter atomically (temp dir + rename): a crash never leaves a half-written adapter.
    ``architecture``: the base model's, which decides the module names (an image-text model's differ).

    Collective: every rank must call it; only the global rank 0 writes.
    """
    weights = adapter_state_dict(model)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    image_text = architecture is not None and family_of(architecture.architectures, architecture.model_type).image_text
    if image_text:
        weights = {image_text_adapter_key(key): tensor for key, tensor in weights.items()}
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    projections = sorted({key.split(".")[-3] for key in weights})
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    save_file(weights, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_adapter_config(lora, base_model, projections, image_text=image_text)
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG}; expected an HF PEFT LoRA adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    return config


def read_lora_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig an HF PEFT adapter was trained with (dropout 0: inference); raises ValueError for adapter
    settings we cannot apply (regex or per-layer targets, DoRA, rsLoRA, per-module ranks). The one expression
    accepted is the one an image-text model's adapter gets from :func:`save_peft_adapter`."""
    config = read_adapter_config(directory)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = projections_of_targets(targets) or targets
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{directory}: adapter_config.json target_modules must be a list of module names "
                         f"(got {targets!r}); regex targets are not supported")
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise ValueError(f"{directory}: adapter_config.json has {flag}=true, which is not supported")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{directory}: adapter_config.json sets {key}, which is not supported")
    return LoraConfig(adapter_dim=int(config["r"]), alpha=float(config["lora_alpha"]), adapter_dropout=0.0,
                      target_modules=list(targets))


@torch.no_grad()
def load_peft_adapter(model: torch.nn.Module, directory: str | Path) -> None:
    """Copy an HF PEFT adapter's weights into the model's (already attached) LoRA modules, sharding for TP."""
    weights = read_adapter_weights(directory)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    used = set()
    for name, module in lora_modules(model).items():
        layer_index, linear = _layer_index(name, model), _linear(name)
        dims = _shard_dims(module)
        for projection, pair in module.adapters.items():
            for matrix, param, dim in (("lora_A", pair.lora_A, dims[0]), ("lora_B", pair.lora_B, dims[1])):
                key = _hf_key(layer_index, linear, projection, matrix)
                if key not in weights:
                    raise KeyError(f"{directory}: adapter has no {key}; was it trained with the same target_modules?")
                full = weights[key]
                if matrix == "lora_B" and isinstance(module, ColumnParallelLoRA):
                    shard = module.slice(projection).rows_from_hf(full, tp_rank, tp_size)
                else:
                    shard = full if dim is None else full.chunk(tp_size, dim=dim)[tp_rank]
                if shard.shape != param.shape:
                    raise ValueError(f"{directory}: {key} has shape {tuple(full.shape)}, which does not fit this "
                                     f"model (shard {tuple(param.shape)}); check the base model and adapter rank")
                param.copy_(shard.to(param.dtype))
                used.add(key)
    stage_keys = {k for k in weights if int(k.split(".layers.")[1].split(".")[0]) in
                  {layer.layer_number - 1 for layer in model.decoder.layers}}
    unused = stage_keys - used
    if unused:
        raise KeyError(f"{directory}: adapter weights {sorted(unused)[:4]} have no matching LoRA module; attach LoRA "
                       "with the adapter's target_modules first")


def read_adapter_weights(directory: str | Path) -> Dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` under the text model's module names (an image-text model's adapter renamed)."""
    return {text_adapter_key(key): tensor for key, tensor in load_file(str(Path(directory) / ADAPTER_WEIGHTS)).items()}
