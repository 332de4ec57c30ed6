"""LoRA layers for Megatron's column- and row-parallel linears.

The tensor-parallel rule, written once:
- column-parallel base (``linear_qkv``, ``linear_fc1``): A is replicated, B is sharded on the output like the base.
  The rank-r activation ``A x`` is identical on every rank; its gradient is all-reduced (``copy_to_…``) so A's
  gradient and the input gradient are complete and identical everywhere.
- row-parallel base (``linear_proj``, ``linear_fc2``): A is sharded on the input like the base, B is replicated.
  The partial ``A_shard x_shard`` is summed over ranks (reduce-scattered over the sequence under SP), then B applies.

A fused column-parallel output holds several HF projections (q, k, v interleaved per query group; gate then up).
Each adapted projection has its own A/B pair (what HF PEFT exports) whose output is added into its slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core.tensor_parallel import (
    set_tensor_model_parallel_attributes,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def _init_lora_a(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Kaiming-uniform (a=√5), as PEFT and nn.Linear do, from a seed that is the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


@dataclass(frozen=True)
class FusedSlice:
    """Where one HF projection lives in a fused column-parallel output, per group: ``[offset, offset + width)``."""

    name: str
    offset: int
    width: int


class LoraPair(torch.nn.Module):
    """``lora_A`` (rank × in) and ``lora_B`` (out × rank) for this rank's shard of one projection."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype: torch.dtype, device, a_init: torch.Tensor):
        super().__init__()
        self.lora_A = torch.nn.Parameter(a_init.to(dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        assert self.lora_A.shape == (rank, in_features)


class LoraModule(torch.nn.Module):
    """Common part: wraps the base linear (frozen) and owns named adapter pairs."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.adapters = torch.nn.ModuleDict()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))

    def adapter_params(self) -> Dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("base.")}


class ColumnParallelLoRA(LoraModule):
    """LoRA around a ColumnParallelLinear whose output is ``groups`` repeats of the given slices."""

    def __init__(self, base, *, slices: Sequence[FusedSlice], groups: int, targets: Sequence[str], rank: int,
                 alpha: float, dropout: float, seed: int, tp_rank: int, tp_size: int):
        super().__init__(base, rank, alpha, dropout)
        self.slices = list(slices)
        self.groups = groups
        self.group_width = sum(s.width for s in slices)
        weight = base.weight
        in_features = weight.shape[1]
        for index, piece in enumerate(self.slices):
            if piece.name in targets:
                a_init = _init_lora_a(rank, in_features, seed + index)
                pair = LoraPair(in_features, piece.width * groups, rank, weight.dtype, weight.device, a_init)
                # B is this rank's shard: mark it so mcore's grad-norm counts every rank's part (not as a duplicate).
                set_tensor_model_parallel_attributes(pair.lora_B, is_parallel=True, dim=0, stride=1)
                self.adapters[piece.name] = pair

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)  # out: (s, b, groups * group_width) on this rank
        if self.sequence_parallel:
            # (s/tp, b, in) → (s, b, in); our input gradient is complete on every rank, so backward just splits.
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        x = self.dropout(x)
        grouped = out.view(*out.shape[:-1], self.groups, self.group_width)
        pieces: List[torch.Tensor] = []
        for piece in self.slices:
            part = grouped[..., piece.offset:piece.offset + piece.width]
            if piece.name in self.adapters:
                pair = self.adapters[piece.name]
                hidden = copy_to_tensor_model_parallel_region(x @ pair.lora_A.t())  # (s, b, rank)
                delta = (hidden @ pair.lora_B.t()) * self.scaling  # (s, b, groups * width)
                part = part + delta.view(*delta.shape[:-1], self.groups, piece.width)
            pieces.append(part)
        return torch.cat(pieces, dim=-1).reshape(out.shape), bias


class RowParallelLoRA(LoraModule):
    """LoRA around a RowParallelLinear (input sharded over TP; output reduced, or reduce-scattered under SP)."""

    def __init__(self, base, *, name: str, rank: int, alpha: float, dropout: float, seed: int, tp_rank: int,
                 tp_size: int):
        super().__init__(base, rank, alpha, dropout)
        weight = base.weight
        out_features, in_local = weight.shape
        # Draw the full A (same seed everywhere) and keep this rank's input columns, so TP=N equals TP=1.
        full_a = _init_lora_a(rank, in_local * tp_size, seed)
        a_init = full_a[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        self.adapters[name] = LoraPair(in_local, out_features, rank, weight.dtype, weight.device, a_init)
        set_tensor_model_parallel_attributes(self.adapters[name].lora_A, is_parallel=True, dim=1, stride=1)
        if self.sequence_parallel:
            # Each rank sees a different slice of the sequence, so B's gradient is partial: finalize_model_grads
            # all-reduces parameters marked like this over the TP group.
            setattr(self.adapters[name].lora_B, "sequence_parallel", True)
        self.name = name

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        pair = self.adapters[self.name]
        partial = self.dropout(x) @ pair.lora_A.t()  # (s, b, rank), summed over TP below
        if self.sequence_parallel:
            hidden = reduce_scatter_to_sequence_parallel_region(partial)  # (s/tp, b, rank)
        else:
            hidden = reduce_from_tensor_model_parallel_region(partial)
        return out + (hidden @ pair.lora_B.t()) * self.scaling, bias


def lora_modules(model: torch.nn.Module) -> Dict[str, LoraModule]:
    """Every LoRA wrapper in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraModule)}


def adapter_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """All adapter parameters (the trainable set of a LoRA job), by full name."""
    params: Dict[str, torch.nn.Parameter] = {}
    for prefix, module in lora_modules(model).items():
        for name, p in module.adapter_params().items():
            params[f"{prefix}.{name}"] = p
    return params


def find_pair(model: torch.nn.Module, module_name: str, projection: str) -> Optional[LoraPair]:
    module = dict(model.named_modules()).get(module_name)
    if isinstance(module, LoraModule) and projection in module.adapters:
        return module.adapters[projection]
    return None
