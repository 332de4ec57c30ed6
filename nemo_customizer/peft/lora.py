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

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, Sequence, Tuple

import torch
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
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
    blocks: Tuple[int, ...] = ()
    """For an HF projection that is itself fused (Phi-3's ``qkv_proj``: q, k, v; ``gate_up_proj``: gate, up): the
    widths of its HF row blocks within one group. HF keeps each block's rows of all groups together; the fused
    output (and so this adapter's B) keeps each group whole. For ``gate_up_proj`` a group is one rank's rows."""

    def rows_to_hf(self, b: torch.Tensor) -> torch.Tensor:
        """B's rows gathered over tensor-parallel ranks, in the fused output's order → in HF's order."""
        if not self.blocks:
            return b
        grouped = b.reshape(-1, self.width, b.shape[-1])  # (groups of every rank, width, r)
        return torch.cat([part.reshape(-1, b.shape[-1]) for part in grouped.split(list(self.blocks), dim=1)])

    def rows_from_hf(self, b: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The inverse of :meth:`rows_to_hf`, then this rank's share of the rows."""
        if not self.blocks:
            return b.chunk(tp_size, dim=0)[tp_rank]
        groups = b.shape[0] // self.width
        parts = b.split([groups * width for width in self.blocks])
        grouped = torch.cat([part.reshape(groups, width, -1) for part, width in zip(parts, self.blocks)], dim=1)
        return grouped.chunk(tp_size, dim=0)[tp_rank].reshape(-1, b.shape[-1])


class LoraPair(torch.nn.Module):
    """``lora_A`` (rank × in) and ``lora_B`` (out × rank) for this rank's shard of one projection."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype: torch.dtype, device, a_init: torch.Tensor):
        super().__init__()
        # A copy in its own contiguous storage: a_init may be a column slice of the full A (a strided view that would
        # keep the whole A alive), and fused optimizer kernels assume parameters and gradients share one layout.
        self.lora_A = torch.nn.Parameter(a_init.to(dtype=dtype, device=device, copy=True,
                                                   memory_format=torch.contiguous_format))
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
        self.enabled = True
        """False: the forward is the base linear's alone (``adapters_disabled``)."""

    def adapter_params(self) -> Dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("base.")}

    def _adapter_tp_axes(self) -> Dict[str, int]:
        """``adapters.<name>.lora_X`` → the dim it is sharded on over TP (absent: replicated)."""
        raise NotImplementedError

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """For ``megatron.core.dist_checkpointing``: the base as mcore shards it, adapters with their TP axis.

        Without this, mcore would treat the wrapper as an unknown module and save every tensor (the TP-sharded
        base weight and B/A shards included) as replicated, which breaks resharding (save at TP=2, load at TP=1).
        """
        state = self.base.sharded_state_dict(f"{prefix}base.", sharded_offsets, metadata)
        adapters = self.adapters.state_dict(prefix="adapters.", keep_vars=True)
        state.update(make_sharded_tensors_for_checkpoint(adapters, prefix, self._adapter_tp_axes(), sharded_offsets))
        return state


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
                if self.sequence_parallel:  # its gradient comes from this rank's tokens only: see forward
                    setattr(pair.lora_A, "sequence_parallel", True)
                self.adapters[piece.name] = pair

    def slice(self, name: str) -> FusedSlice:
        """Where HF projection ``name`` lives in the fused output."""
        return next(piece for piece in self.slices if piece.name == name)

    def _adapter_tp_axes(self) -> Dict[str, int]:
        # B's rows are this rank's query groups (or FFN columns) of the projection, in order: concatenating the
        # ranks' B along dim 0 gives the TP=1 B.
        return {f"adapters.{name}.lora_B": 0 for name in self.adapters}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for piece in self.slices:
            if piece.name in self.adapters and len(piece.blocks) == 2:
                # gate_up_proj (qkv_proj has three blocks): this rank's B rows are its gate rows, then its up rows,
                # so the ranks' B concatenated is not the TP=1 B. Saved as two tensors each sharded over TP, as
                # mcore saves linear_fc1's weight, a checkpoint loads at another tensor-parallel size.
                key = f"{prefix}adapters.{piece.name}.lora_B"
                state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets,
                                                          (metadata or {}).get("singleton_local_shards", False))
        return state

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self.enabled:
            return self.base(x, *args, **kwargs)
        out, bias = self.base(x, *args, **kwargs)  # out: (s, b, groups * group_width) on this rank
        x = self.dropout(x)
        # All adapters of the fused output in two GEMMs instead of two per adapter plus slicing and re-concatenating
        # the whole output: A stacked over adapters, and B placed into the fused output's rows (zeros elsewhere).
        pairs = list(self.adapters.values())
        stacked_a = pairs[0].lora_A if len(pairs) == 1 else torch.cat([p.lora_A for p in pairs])
        if self.sequence_parallel:
            # x is this rank's slice of the sequence. A is replicated, so gather the rank-r product, not x: 1/256 of
            # the traffic at hidden 4096 and r 16. Backward reduce-scatters its gradient (each rank holds the part
            # from its B shard), and A's gradient, from this rank's tokens only, is summed over TP by
            # finalize_model_grads (A is marked sequence_parallel).
            hidden = gather_from_sequence_parallel_region(x @ stacked_a.t(), tensor_parallel_output_grad=True)
        else:
            hidden = copy_to_tensor_model_parallel_region(x @ stacked_a.t())  # (s, b, adapters * rank)
        return _add_low_rank(out, hidden * self.scaling, self._fused_b()), bias

    def _fused_b(self) -> torch.Tensor:
        """``(groups * group_width, adapters * rank)``: adapter k's B in its projection's rows, columns k·r…(k+1)·r."""
        rank, count = self.rank, len(self.adapters)
        names = list(self.adapters)
        like = self.adapters[names[0]].lora_B
        blocks = []
        for piece in self.slices:
            if piece.name in self.adapters:
                k = names.index(piece.name)
                b = self.adapters[piece.name].lora_B.view(self.groups, piece.width, rank)
                blocks.append(torch.nn.functional.pad(b, (k * rank, (count - k - 1) * rank)))
            else:
                blocks.append(like.new_zeros(self.groups, piece.width, count * rank))
        return torch.cat(blocks, dim=1).reshape(self.groups * self.group_width, count * rank)


def _add_low_rank(out: torch.Tensor, hidden: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """``out + hidden @ weight_b.T`` as one GEMM whose epilogue adds ``out`` (no separate full-size add)."""
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight_b.t())
    return flat.view(out.shape)


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

    def _adapter_tp_axes(self) -> Dict[str, int]:
        return {f"adapters.{self.name}.lora_A": 1}

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self.enabled:
            return self.base(x, *args, **kwargs)
        out, bias = self.base(x, *args, **kwargs)
        pair = self.adapters[self.name]
        partial = self.dropout(x) @ pair.lora_A.t()  # (s, b, rank), summed over TP below
        if self.sequence_parallel:
            hidden = reduce_scatter_to_sequence_parallel_region(partial)  # (s/tp, b, rank)
        else:
            hidden = reduce_from_tensor_model_parallel_region(partial)
        return _add_low_rank(out, hidden * self.scaling, pair.lora_B), bias


def lora_modules(model: torch.nn.Module) -> Dict[str, LoraModule]:
    """Every LoRA wrapper in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraModule)}


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[int]:
    """Run ``model`` as its base model: every LoRA wrapper forwards through its base linear alone (no copy of any
    weight); yields how many wrappers were switched off. Switched back on when the block ends."""
    modules = list(lora_modules(model).values())
    for module in modules:
        module.enabled = False
    try:
        yield len(modules)
    finally:
        for module in modules:
            module.enabled = True


def adapter_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """All adapter parameters (the trainable set of a LoRA job), by full name."""
    params: Dict[str, torch.nn.Parameter] = {}
    for prefix, module in lora_modules(model).items():
        for name, p in module.adapter_params().items():
            params[f"{prefix}.{name}"] = p
    return params
