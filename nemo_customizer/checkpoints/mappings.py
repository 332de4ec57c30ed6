"""Tensor-parallel weight mappings between one HF tensor (or a few) and one Megatron parameter shard.

Tensor-parallel slicing lives only here. Each mapping knows which HF tensors feed a Megatron parameter, how to cut
this rank's shard out of them (reading only that slice from disk), and how to put gathered shards back into HF
tensors for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Protocol

import torch

# read(hf_name, dim, start, stop) -> the slice [start:stop) of that tensor along dim (dim=None: the whole tensor)
SliceReader = Callable[[str, "int | None", int, int], torch.Tensor]


@dataclass(frozen=True)
class TPShard:
    """This rank's position in the tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def bounds(self, full: int, what: str) -> tuple[int, int]:
        if full % self.size:
            raise ValueError(f"{what} ({full}) is not divisible by tensor_parallel_size {self.size}")
        part = full // self.size
        return self.rank * part, (self.rank + 1) * part


class WeightMapping(Protocol):
    hf_names: List[str]

    def load_shard(self, read: SliceReader, full_shapes: Dict[str, torch.Size], tp: TPShard) -> torch.Tensor: ...

    def export(self, shards: List[torch.Tensor]) -> Dict[str, torch.Tensor]: ...


@dataclass
class Replicated:
    """Same tensor on every rank (norm weights)."""

    hf_name: str

    @property
    def hf_names(self) -> List[str]:
        return [self.hf_name]

    def load_shard(self, read, full_shapes, tp):
        return read(self.hf_name, None, 0, 0)

    def export(self, shards):
        return {self.hf_name: shards[0]}


@dataclass
class Split:
    """Sharded along one dim: dim 0 for column-parallel and vocab-parallel weights, dim 1 for row-parallel."""

    hf_name: str
    dim: int

    @property
    def hf_names(self) -> List[str]:
        return [self.hf_name]

    def load_shard(self, read, full_shapes, tp):
        start, stop = tp.bounds(full_shapes[self.hf_name][self.dim], self.hf_name)
        return read(self.hf_name, self.dim, start, stop)

    def export(self, shards):
        return {self.hf_name: torch.cat(shards, dim=self.dim)}


@dataclass
class GatedMLP:
    """``linear_fc1`` = this rank's gate rows followed by its up rows (mcore's SwiGLU chunks fc1 output in two)."""

    gate: str
    up: str

    @property
    def hf_names(self) -> List[str]:
        return [self.gate, self.up]

    def load_shard(self, read, full_shapes, tp):
        start, stop = tp.bounds(full_shapes[self.gate][0], self.gate)
        return torch.cat([read(self.gate, 0, start, stop), read(self.up, 0, start, stop)], dim=0)

    def export(self, shards):
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return {self.gate: torch.cat([h[0] for h in halves]), self.up: torch.cat([h[1] for h in halves])}


@dataclass
class QKV:
    """``linear_qkv`` rows are interleaved per query group: [q × heads/groups, k, v] for each group.

    Rank r holds query groups [r·G/tp, (r+1)·G/tp), which are HF heads in order, so the HF q/k/v rows of those
    groups are read and interleaved.
    """

    q: str
    k: str
    v: str
    num_heads: int
    num_groups: int
    head_dim: int

    @property
    def hf_names(self) -> List[str]:
        return [self.q, self.k, self.v]

    def load_shard(self, read, full_shapes, tp):
        g0, g1 = tp.bounds(self.num_groups, "num_key_value_heads")
        per_group = self.num_heads // self.num_groups
        d = self.head_dim
        q = read(self.q, 0, g0 * per_group * d, g1 * per_group * d)
        k = read(self.k, 0, g0 * d, g1 * d)
        v = read(self.v, 0, g0 * d, g1 * d)
        groups = g1 - g0
        tail = q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], dim=1
        )  # (groups, (per_group + 2) * d, ...)
        return fused.reshape(groups * (per_group + 2) * d, *tail)

    def split_local(self, fused: torch.Tensor, local_groups: int):
        """One rank's fused rows → its (q, k, v) rows in HF order."""
        per_group = self.num_heads // self.num_groups
        d = self.head_dim
        tail = fused.shape[1:]
        grouped = fused.reshape(local_groups, (per_group + 2) * d, *tail)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)

    def export(self, shards):
        local_groups = self.num_groups // len(shards)
        parts = [self.split_local(shard, local_groups) for shard in shards]
        return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate((self.q, self.k, self.v))}


@dataclass
class FusedQKV:
    """One HF tensor holding q, k and v rows one after the other (Phi-3's ``qkv_proj``) → ``linear_qkv``,
    interleaved per query group like :class:`QKV` (which does the work on the three row ranges)."""

    hf_name: str
    num_heads: int
    num_groups: int
    head_dim: int

    @property
    def hf_names(self) -> List[str]:
        return [self.hf_name]

    def _parts(self) -> QKV:
        return QKV("q", "k", "v", num_heads=self.num_heads, num_groups=self.num_groups, head_dim=self.head_dim)

    def load_shard(self, read, full_shapes, tp):
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        first_row = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}

        def read_part(part, dim, start, stop):
            return read(self.hf_name, 0, first_row[part] + start, first_row[part] + stop)

        return self._parts().load_shard(read_part, full_shapes, tp)

    def export(self, shards):
        parts = self._parts().export(shards)
        return {self.hf_name: torch.cat([parts["q"], parts["k"], parts["v"]])}


@dataclass
class FusedGatedMLP:
    """One HF tensor holding the gate rows then the up rows (Phi-3's ``gate_up_proj``) → ``linear_fc1``, each rank
    holding its gate rows followed by its up rows like :class:`GatedMLP`."""

    hf_name: str

    @property
    def hf_names(self) -> List[str]:
        return [self.hf_name]

    def load_shard(self, read, full_shapes, tp):
        inner = full_shapes[self.hf_name][0] // 2
        start, stop = tp.bounds(inner, self.hf_name)
        return torch.cat([read(self.hf_name, 0, start, stop), read(self.hf_name, 0, inner + start, inner + stop)])

    def export(self, shards):
        parts = GatedMLP("gate", "up").export(shards)
        return {self.hf_name: torch.cat([parts["gate"], parts["up"]])}
