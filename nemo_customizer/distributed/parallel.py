"""The only place that initializes torch.distributed and megatron-core's model-parallel state.

One code path for one and many processes: a plain ``python`` run becomes a world of size 1 (gloo over a local
TCP store), a ``torchrun`` run reads RANK/WORLD_SIZE from the environment. CPU runs use gloo, CUDA runs NCCL.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from nemo_customizer.compat import CpuAdaptations


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    data_parallel_rank: int
    device: torch.device
    owns_process_group: bool = True
    """Whether ``initialize_parallel`` started torch.distributed (and so ``destroy_parallel`` may end it)."""
    cpu_adaptations: Optional["CpuAdaptations"] = field(default=None, repr=False, compare=False)
    """A CPU job's hold on megatron-core's CPU adaptations (``compat.enter_cpu_adaptations``), which
    ``destroy_parallel`` releases."""

    @property
    def is_main(self) -> bool:
        """The one rank that writes job files and prints progress."""
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch sees no GPU; use device=cpu or device=auto.")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    return torch.device(requested)


def params_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Weights dtype for a job: ``auto`` is bf16 on CUDA and fp32 on CPU. ``fp8`` builds the weights as ``auto`` does:
    the training job converts its frozen linears afterwards (``models.fp8_linear``; on the CPU, where mcore trains
    fp32 only, its tests simulate FP8 around fp32), and inference runs them unconverted."""
    if precision in ("auto", "fp8"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(device: torch.device, single_process: bool = False) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not single_process:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = dist.TCPStore("127.0.0.1", free_port(), world_size=1, is_master=True)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)


def initialize_parallel(
    *, tensor_parallel_size: int, pipeline_parallel_size: int, device: torch.device, seed: int,
    single_process: bool = False,
) -> ParallelLayout:
    """Start torch.distributed (if needed) and mcore's parallel groups; seed every RNG mcore uses.

    ``single_process``: a world of this process alone even under a launcher (RANK/WORLD_SIZE set), for work one
    process does by itself (generation, evaluation on the main rank after training).
    On a CPU ``device`` megatron-core's CPU adaptations (``compat.megatron_cpu``) are live until ``destroy_parallel``
    of the returned layout; a layout started while another CPU one is live holds them too.
    """
    from nemo_customizer.compat import enter_cpu_adaptations

    cpu_adaptations = enter_cpu_adaptations() if device.type == "cpu" else None
    try:
        layout = _initialize(tensor_parallel_size, pipeline_parallel_size, device, seed, single_process)
    except BaseException:
        if cpu_adaptations is not None:
            cpu_adaptations.exit()
        raise
    return replace(layout, cpu_adaptations=cpu_adaptations)


def _initialize(tensor_parallel_size: int, pipeline_parallel_size: int, device: torch.device, seed: int,
                single_process: bool) -> ParallelLayout:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    owns_process_group = not dist.is_initialized()
    if owns_process_group:
        _init_process_group(device, single_process)
    world_size = dist.get_world_size()
    model_parallel = tensor_parallel_size * pipeline_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel_size × pipeline_parallel_size "
            f"= {tensor_parallel_size} × {pipeline_parallel_size}; launch a multiple of {model_parallel} processes."
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        owns_process_group=owns_process_group,
    )


def use_graph_safe_rng() -> None:
    """Switch mcore's RNG tracker to generator objects a CUDA graph capture can use, keeping every state.

    With sequence parallelism mcore forks the tracker's tensor-parallel state around each transformer block; the
    default tracker sets the CUDA generator from a state tensor, which a capture refuses ("set_current_seed can be
    called during stream capture only if new seed is the same"). The graph-safe tracker swaps generator objects
    instead; each capture registers them (``rng_states_to_register``).
    """
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    if mcore_random.is_graph_safe_cuda_rng_tracker(tracker):
        return
    states = {name: mcore_random.convert_cuda_rng_state(state, to_graphable=True)
              for name, state in tracker.get_states().items()}
    mcore_random.initialize_rng_tracker(use_cudagraphable_rng=True, force_reset=True)
    mcore_random.get_cuda_rng_tracker().set_states(states)


def rng_states_to_register() -> list:
    """The tracker's generators a CUDA graph must register before its capture (empty unless graph-safe)."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    if not mcore_random.is_graph_safe_cuda_rng_tracker(tracker):
        return []
    return list(tracker.get_states().values())


def rng_tracker_states() -> dict:
    """The tracker's states as tensors (a graph-safe tracker holds generator objects): what a checkpoint saves."""
    from megatron.core.tensor_parallel import random as mcore_random

    return {name: mcore_random.convert_cuda_rng_state(state, to_graphable=False)
            for name, state in mcore_random.get_cuda_rng_tracker().get_states().items()}


def set_rng_tracker_states(states: dict) -> None:
    """Restore ``rng_tracker_states()``, as generator objects again if the tracker is graph-safe (new objects: call
    it before any capture, as a resume does, since a captured graph keeps the generators it registered)."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    if mcore_random.is_graph_safe_cuda_rng_tracker(tracker):
        states = {name: mcore_random.convert_cuda_rng_state(state, to_graphable=True) for name, state in states.items()}
    tracker.set_states(states)


def destroy_parallel(layout: ParallelLayout | None = None) -> None:
    """Tear down mcore's groups, and the process group if ``initialize_parallel`` started it; release the layout's
    hold on the CPU adaptations (``layout=None``: every hold), so that a CUDA job can follow in this process.

    Lets one process run several jobs in turn, without ending a process group that the caller set up itself.
    """
    from megatron.core import parallel_state

    from nemo_customizer.compat import exit_all_cpu_adaptations

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and (layout is None or layout.owns_process_group):
        dist.destroy_process_group()
    if layout is None:
        exit_all_cpu_adaptations()
    elif layout.cpu_adaptations is not None:
        layout.cpu_adaptations.exit()
