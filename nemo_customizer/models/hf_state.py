"""The whole model's base weights gathered under HF names, for export: the inverse of ``gpt.load_hf_checkpoint``.

Each parameter's tensor-parallel shards are gathered and put back into HF tensors by the family's weight mappings
(``mapping.export`` is the inverse of ``mapping.load_shard``), and the pipeline stages' tensors are merged.
``checkpoints.hf_export.save_hf_checkpoint`` writes the result.
"""

from __future__ import annotations

from typing import Dict

import torch

from nemo_customizer.checkpoints.mappings import Replicated
from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.distributed.collectives import gather_pipeline_objects, gather_tensor_parallel_shards
from nemo_customizer.models.gpt import stage_layer_numbers, unwrap
from nemo_customizer.models.registry import family_for


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
