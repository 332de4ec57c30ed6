"""Many LoRA adapters on one copy of the base weights, chosen per batch row (for serving).

Training attaches one adapter by wrapping the targeted linears (``peft.lora``). A server instead wraps all four
linears of every layer once with :class:`MultiLoRALinear`, which holds any number of adapters' A/B matrices and,
on each forward, adds to every batch row the delta of the adapter that row asked for (``MultiLoRA.select``).
Rows are grouped by adapter, and a group's delta is computed exactly as ``ColumnParallelLoRA`` /
``RowParallelLoRA`` compute it (``(x @ A.T) @ B.T * alpha / r``, added to the base output's slice), so a row gives
the same tokens as a model with that one adapter attached. Adapters may differ in rank (up to ``max_rank``) and in
target modules. One process holds the whole model (tensor parallel size 1), as ``Generator`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from nemo_customizer.config.schema import ArchitectureConfig
from nemo_customizer.peft.apply import _LINEAR_PATHS, _fused_slices, hf_projections, resolve_targets
from nemo_customizer.peft.export import _hf_key, read_adapter_weights, read_lora_config
from nemo_customizer.peft.lora import FusedSlice

# (A (r, in), B (out, r), alpha / r) of one adapter on one HF projection
_Pair = Tuple[torch.Tensor, torch.Tensor, float]


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter, as the server lists it."""

    name: str
    path: str
    rank: int
    alpha: float
    target_modules: List[str]


class _Selection:
    """Which rows of the current batch use which adapter: ``[(name, rows)]``, rows None meaning every row."""

    def __init__(self):
        self.groups: List[Tuple[str, Optional[torch.Tensor]]] = []


class MultiLoRALinear(torch.nn.Module):
    """A base linear (its output ``groups`` repeats of ``slices``, like ``ColumnParallelLoRA``'s) plus per-row
    LoRA deltas of the adapters it holds."""

    def __init__(self, base: torch.nn.Module, slices: Sequence[FusedSlice], groups: int, selection: _Selection):
        super().__init__()
        self.base = base
        self.slices = list(slices)
        self.groups = groups
        self.group_width = sum(piece.width for piece in self.slices)
        self.selection = selection
        # adapter name -> HF projection -> (A, B, scaling); plain tensors, not parameters: nothing here trains
        self.weights: Dict[str, Dict[str, _Pair]] = {}

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)  # out: (s, b, groups * group_width), a fresh tensor
        for name, rows in self.selection.groups:
            pairs = self.weights.get(name)
            if not pairs:
                continue
            xs = x if rows is None else x.index_select(1, rows)  # (s, k, in)
            grouped = out.view(*out.shape[:-1], self.groups, self.group_width)
            for piece in self.slices:
                if piece.name not in pairs:
                    continue
                a, b, scaling = pairs[piece.name]
                delta = ((xs @ a.t()) @ b.t()) * scaling  # (s, k, groups * width)
                delta = delta.view(*delta.shape[:-1], self.groups, piece.width)
                part = grouped[..., piece.offset:piece.offset + piece.width]  # a view into out
                if rows is None:
                    part += delta
                else:
                    part.index_add_(1, rows, delta)
        return out, bias


class MultiLoRA:
    """Load, list, remove and select LoRA adapters on a model whose linears this wraps (TP=1)."""

    def __init__(self, model: torch.nn.Module, arch: ArchitectureConfig, *, max_rank: int):
        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("serving several adapters needs the whole model in one process (tensor parallel 1)")
        if max_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {max_rank}")
        self.max_rank = max_rank
        self.adapters: Dict[str, AdapterInfo] = {}
        self._selection = _Selection()
        self._layers: Dict[int, Dict[str, MultiLoRALinear]] = {}  # HF layer index -> Megatron linear -> wrapper
        self._projections = hf_projections(arch)  # the family's HF names, as its PEFT adapters use them
        for layer in model.decoder.layers:
            wrapped = {}
            for linear, path in _LINEAR_PATHS.items():
                parent_path, attr = path.rsplit(".", 1)
                parent = layer.get_submodule(parent_path)
                base = getattr(parent, attr)
                if linear in ("linear_qkv", "linear_fc1"):
                    slices, groups = _fused_slices(linear, arch, tp_size=1)
                else:  # row-parallel: one projection, the whole output
                    (projection,) = self._projections[linear]
                    slices, groups = [FusedSlice(projection, 0, base.weight.shape[0])], 1
                wrapped[linear] = MultiLoRALinear(base, slices, groups, self._selection)
                setattr(parent, attr, wrapped[linear])
            self._layers[layer.layer_number - 1] = wrapped
        first = next(iter(self._layers.values()))["linear_qkv"].base.weight
        self._dtype, self._device = first.dtype, first.device

    @property
    def names(self) -> List[str]:
        return sorted(self.adapters)

    def add(self, name: str, directory: str | Path) -> AdapterInfo:
        """Load the HF PEFT adapter in ``directory`` under ``name``.

        Raises ValueError (the message names the file and the problem) for a rank above ``max_rank``, targets this
        model does not have, or weights whose shapes do not fit the base model.
        """
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        lora = read_lora_config(directory)
        if lora.adapter_dim > self.max_rank:
            raise ValueError(f"{directory}: adapter rank r={lora.adapter_dim} is above this server's max_lora_rank="
                             f"{self.max_rank}; restart with serving.max_lora_rank={lora.adapter_dim} or more")
        try:
            targets = resolve_targets(list(lora.target_modules), self._projections)
        except ValueError as exc:  # its messages name the training config key; name the adapter file instead
            raise ValueError(f"{directory}: adapter_config.json target_modules {lora.target_modules}: {exc}") from exc
        weights = read_adapter_weights(directory)
        scaling = lora.alpha / lora.adapter_dim
        staged: Dict[Tuple[int, str], Dict[str, _Pair]] = {}
        used = set()
        for layer_index, wrapped in self._layers.items():
            for linear, projections in targets.items():
                module = wrapped[linear]
                pairs = {}
                for piece in module.slices:
                    if piece.name not in projections:
                        continue
                    keys = [_hf_key(layer_index, linear, piece.name, matrix) for matrix in ("lora_A", "lora_B")]
                    missing = [key for key in keys if key not in weights]
                    if missing:
                        raise ValueError(f"{directory}: adapter has no {missing[0]}, though its target_modules name "
                                         f"{piece.name}")
                    a, b = (weights[key] for key in keys)
                    in_features = module.base.weight.shape[1]
                    expected = ((lora.adapter_dim, in_features), (piece.width * module.groups, lora.adapter_dim))
                    if (tuple(a.shape), tuple(b.shape)) != expected:
                        raise ValueError(f"{directory}: {piece.name} of layer {layer_index} has A {tuple(a.shape)} "
                                         f"and B {tuple(b.shape)}, but this base model needs {expected[0]} and "
                                         f"{expected[1]}; was the adapter trained on another base model?")
                    b = piece.rows_from_hf(b, tp_rank=0, tp_size=1)  # a fused HF projection's rows in our order
                    pairs[piece.name] = (a.to(self._device, self._dtype), b.to(self._device, self._dtype), scaling)
                    used.update(keys)
                staged[(layer_index, linear)] = pairs
        unused = sorted(set(weights) - used)
        if unused:
            raise ValueError(f"{directory}: adapter weights {unused[:3]} match no layer of this model; was it "
                             "trained on another base model?")
        # install only once everything checked out: a failed load leaves no partial adapter behind
        for (layer_index, linear), pairs in staged.items():
            self._layers[layer_index][linear].weights[name] = pairs
        info = AdapterInfo(name=name, path=str(directory), rank=lora.adapter_dim, alpha=lora.alpha,
                           target_modules=sorted({p for names in targets.values() for p in names}))
        self.adapters[name] = info
        return info

    def remove(self, name: str) -> None:
        """Forget adapter ``name``; the caller makes sure no row still uses it."""
        if name not in self.adapters:
            raise KeyError(name)
        del self.adapters[name]
        for wrapped in self._layers.values():
            for module in wrapped.values():
                module.weights.pop(name, None)

    def select(self, row_adapters: Sequence[Optional[str]]) -> None:
        """Set the adapter of each row of the next forward's batch (None: the base model)."""
        names = set(row_adapters) - {None}
        if len(names) == 1 and None not in row_adapters:
            self._selection.groups = [(next(iter(names)), None)]  # every row: no gather, the single-adapter path
            return
        self._selection.groups = [
            (name, torch.tensor([i for i, row in enumerate(row_adapters) if row == name], device=self._device))
            for name in sorted(names)]

