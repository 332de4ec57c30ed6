"""Stream an HF safetensors checkpoint into a (tensor/pipeline-parallel) Megatron model.

Each rank opens the safetensors files lazily and reads only the slices its shard needs, so importing a large model
never holds the whole checkpoint in one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from safetensors import safe_open

from nemo_customizer.checkpoints.mappings import TPShard, WeightMapping


class SafetensorsCheckpoint:
    """Random access to the tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.directory / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.directory}: no *.safetensors files; model.checkpoint must be an HF checkpoint directory"
                    " with config.json and safetensors weights."
                )
            self._file_of = {}
            for path in files:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        self._file_of[name] = path
        self._handles: Dict[Path, object] = {}

    def _handle(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """The whole tensor (dim=None) or its [start, stop) slice along dim 0 or 1."""
        sliced = self._handle(name).get_slice(name)
        if dim is None:
            return sliced[:]
        if dim == 0:
            return sliced[start:stop]
        if dim == 1:
            return sliced[:, start:stop]
        raise ValueError(f"unsupported slice dim {dim}")

    def names(self):
        return self._file_of.keys()


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, checkpoint: SafetensorsCheckpoint, mappings: Dict[str, WeightMapping], tp: TPShard
) -> None:
    """Copy every mapped parameter's shard from the checkpoint (or a view of it with the same methods:
    ``checkpoints.image_text.TextModelWeights``); any unmapped base parameter is an error."""
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in mappings]
    if missing:
        raise KeyError(f"no HF weight mapping for model parameters {missing[:5]}")
    for name, mapping in mappings.items():
        if name not in params:
            continue  # e.g. output_layer.weight when it shares the embedding on this stage
        shapes = {hf: checkpoint.shape(hf) for hf in mapping.hf_names}
        shard = mapping.load_shard(checkpoint.read, shapes, tp)
        target = params[name]
        if shard.shape != target.shape:
            raise ValueError(
                f"{checkpoint.directory}: {mapping.hf_names} gives shape {tuple(shard.shape)} for {name}, expected "
                f"{tuple(target.shape)}; does config.json match the weights?"
            )
        target.copy_(shard.to(dtype=target.dtype, device=target.device))
