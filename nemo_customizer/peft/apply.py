"""Attach LoRA to a Megatron GPT model: match targets, wrap the linears, freeze everything else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Set

import torch
from megatron.core import parallel_state

from nemo_customizer.config.families import lora_targets
from nemo_customizer.config.schema import ArchitectureConfig, LoraConfig
from nemo_customizer.models.llama import HF_PROJECTIONS as LLAMA_PROJECTIONS, head_dim
from nemo_customizer.models.registry import family_for
from nemo_customizer.peft.lora import ColumnParallelLoRA, FusedSlice, RowParallelLoRA

_LINEAR_PATHS = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}


@dataclass(frozen=True)
class LoraSummary:
    """What LoRA attached, for the job log."""

    projections: List[str]
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (f"LoRA on {', '.join(self.projections)}: trainable parameters {self.trainable_parameters:,} of "
                f"{self.total_parameters:,} ({share:.3f}%)")


def hf_projections(arch: ArchitectureConfig) -> Dict[str, List[str]]:
    """Megatron linear → the HF projection names in it, as the architecture's family (and PEFT) names them."""
    return family_for(arch).HF_PROJECTIONS


def resolve_targets(target_modules: List[str], projections: Dict[str, List[str]] = LLAMA_PROJECTIONS
                    ) -> Dict[str, Set[str]]:
    """Megatron linear → the HF projections to adapt in it. Megatron names stand for all their parts;
    ``projections`` is the family's ``HF_PROJECTIONS``."""
    to_megatron = {hf: mc for mc, names in projections.items() for hf in names}
    targets: Dict[str, Set[str]] = {}
    for name in target_modules:
        if name in projections:
            targets.setdefault(name, set()).update(projections[name])
        elif name in to_megatron:
            targets.setdefault(to_megatron[name], set()).add(name)
        else:
            known = sorted(list(projections) + list(to_megatron))
            raise ValueError(f"hyperparameters.lora.target_modules: unknown module {name!r}; use any of {known}")
    if not targets:
        raise ValueError("hyperparameters.lora.target_modules is empty; name at least one module, e.g. [q_proj, v_proj]")
    return targets


def _fused_slices(linear: str, arch: ArchitectureConfig, tp_size: int) -> tuple[list[FusedSlice], int]:
    """The HF projections in a column-parallel linear's output (per group) and this rank's number of groups. A
    family whose HF module is itself fused (Phi-3) has one slice over the whole group, with its HF blocks."""
    names = hf_projections(arch)[linear]
    if linear == "linear_qkv":
        d = head_dim(arch)
        q_width = arch.num_attention_heads // arch.num_key_value_heads * d
        groups = arch.num_key_value_heads // tp_size
        if len(names) == 1:
            return [FusedSlice(names[0], 0, q_width + 2 * d, blocks=(q_width, d, d))], groups
        q, k, v = names
        return [FusedSlice(q, 0, q_width), FusedSlice(k, q_width, d), FusedSlice(v, q_width + d, d)], groups
    ffn = arch.intermediate_size // tp_size
    if len(names) == 1:
        return [FusedSlice(names[0], 0, 2 * ffn, blocks=(ffn, ffn))], 1
    gate, up = names
    return [FusedSlice(gate, 0, ffn), FusedSlice(up, ffn, ffn)], 1


def apply_lora(model: torch.nn.Module, arch: ArchitectureConfig, lora: LoraConfig, seed: int) -> LoraSummary:
    """Freeze ``model`` and wrap the targeted linears of every layer in this stage with LoRA (B = 0)."""
    targets = resolve_targets(lora_targets(lora.target_modules, arch.architectures, arch.model_type),
                              hf_projections(arch))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = 0
    for layer in model.decoder.layers:
        layer_index = layer.layer_number - 1
        for linear, projections in targets.items():
            parent_path, attr = _LINEAR_PATHS[linear].rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr)
            # One seed per (layer, linear), independent of rank and pipeline stage.
            adapter_seed = seed * 1_000_003 + layer_index * 17 + list(_LINEAR_PATHS).index(linear) * 5
            common = dict(rank=lora.adapter_dim, alpha=lora.alpha, dropout=lora.adapter_dropout, seed=adapter_seed,
                          tp_rank=tp_rank, tp_size=tp_size)
            if linear in ("linear_qkv", "linear_fc1"):
                slices, groups = _fused_slices(linear, arch, tp_size)
                module = ColumnParallelLoRA(base, slices=slices, groups=groups, targets=sorted(projections), **common)
            else:
                (name,) = projections
                module = RowParallelLoRA(base, name=name, **common)
            setattr(parent, attr, module)
            wrapped += 1
    if wrapped == 0:
        raise ValueError(f"hyperparameters.lora.target_modules {sorted(p for n in targets.values() for p in n)} "
                         "matched no layer")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    projections = sorted({p for names in targets.values() for p in names})
    return LoraSummary(projections, trainable, total)
