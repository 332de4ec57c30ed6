"""The few collectives the library needs outside Megatron's own modules (one path for 1 and N ranks)."""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def gather_tensor_parallel(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate this tensor's shards from every tensor-parallel rank along ``dim`` (rank order)."""
    shards = gather_tensor_parallel_shards(tensor)
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=dim)


def gather_pipeline_objects(obj: Any) -> List[Any]:
    """Every pipeline stage's ``obj`` (picklable), in stage order."""
    size = parallel_state.get_pipeline_model_parallel_world_size()
    if size == 1:
        return [obj]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, obj, group=parallel_state.get_pipeline_model_parallel_group())
    return out


def all_reduce_sum(values: List[float], group=None) -> List[float]:
    """Sum a few floats over a process group (default: the whole world)."""
    return _all_reduce(values, dist.ReduceOp.SUM, group)


def all_reduce_max(values: List[float], group=None) -> List[float]:
    """The largest of each of a few floats over a process group (default: the whole world)."""
    return _all_reduce(values, dist.ReduceOp.MAX, group)


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over a process group in place and return it. On NCCL a CUDA tensor stays on the device (no
    host sync: read it when the step is queued); other backend/device pairs go through a host copy."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    on_nccl = dist.get_backend(group) == "nccl"
    if on_nccl == tensor.is_cuda:
        dist.all_reduce(tensor, group=group)
        return tensor
    staged = tensor.to("cuda" if on_nccl else "cpu")
    dist.all_reduce(staged, group=group)
    return tensor.copy_(staged)


def _all_reduce(values: List[float], op, group) -> List[float]:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(values)
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor.tolist()


def gather_tensor_parallel_shards(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Every tensor-parallel rank's shard of a parameter, in rank order (shapes must match)."""
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return parts
