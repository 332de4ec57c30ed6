"""CUDA graphs for packed training micro batches: each static shape's forward+backward captured once, then replayed.

Why: a small model's training step is CPU-bound. A step launches thousands of operators (Python, mcore modules,
autograd), and for a 1B model the host takes longer to launch them than the GPU takes to run them; at TP=2 a
layer's GPU work halves and the launches do not (docs/PERFORMANCE.md has the measurements). A replayed graph launches the whole forward and backward of a micro batch at once.

A graph replays fixed shapes, and packed micro batches vary: their token count, their number of examples and their
number of loss positions. ``static_shape`` rounds each up to a few sizes and ``pad_to_static`` pads to them with
what changes no loss or gradient:
- tokens: one more segment of its own (``loss_mask`` 0, positions restart at 0), as ``collate_packed`` pads for
  sequence parallelism;
- examples: empty segments (``cu_seqlens`` repeats its last offset; varlen attention gives them no work);
- loss positions: position 0 with weight 0 (``models.gpt.LossPositions``).
``max_seqlen`` is the same for every shape: the longest example any bin can hold (``max_seq_length``).

The first micro batch of a shape runs eagerly on the static buffers (its real gradient; it also compiles the
``torch.compile`` regions for these shapes and creates cuBLAS/NCCL state, which a capture must not do), then the
shape is captured; later micro batches of that shape copy their inputs in and replay. Gradients land in mcore DDP's
``main_grad`` buffers through its backward hooks, captured with the rest; the schedule around the micro batches
(gradient finalization, token count) is mcore's, as in ``step.forward_backward``.

Packed batches only, at PP=1 (``config.validate``): the pipeline schedule exchanges activations between stages
itself. Tensor (and sequence) parallelism's NCCL collectives are captured with the rest: the ranks of a TP group
line up before and after each capture, which runs in "thread_local" mode (NCCL's watchdog thread polls its events),
and mcore's RNG tracker is switched to graph-safe generators (under SP it forks its state around every block). Data
parallelism reduces gradients after the micro batches, outside the graphs. On a CPU the same path runs without
capture (``capture=False``), which is how tests check the padding and the schedule against
``step.forward_backward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from nemo_customizer.distributed.parallel import rng_states_to_register, use_graph_safe_rng

TOKEN_BUCKET = 512
"""Micro batches are padded up to a multiple of about this many tokens (packed bins are nearly full: one size in
practice). Never more than ``max_seqlen``, so the padding is one segment varlen attention covers whole."""
MIN_SEGMENTS = 16
"""Segment capacities are powers of two from this up."""
LOSS_BUCKETS = 4
"""Loss-position capacities are multiples of tokens / LOSS_BUCKETS."""


@dataclass(frozen=True)
class StaticShape:
    tokens: int
    """Positions in the padded row (a multiple of ``token_multiple``)."""
    segments: int
    """``len(cu_seqlens) - 1``, empty segments included."""
    loss_positions: int
    """Length of the loss index; the tail has weight 0."""


@dataclass
class StaticInputs:
    """One micro batch padded to a ``StaticShape`` (host tensors, or device buffers a graph reads)."""

    tokens: torch.Tensor  # [1, T] int64
    labels: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    cu_seqlens: torch.Tensor  # [S + 1] int32
    loss_index: torch.Tensor  # [P] int64, into the flattened (s, b) = (T,) positions
    loss_weight: torch.Tensor  # [P] float32, 1 for real loss positions, 0 for padding
    loss_tokens: int
    """Real loss positions (what mcore's per-token loss divides by)."""

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return (self.tokens, self.labels, self.position_ids, self.cu_seqlens, self.loss_index, self.loss_weight)


def _round_up(value: int, multiple: int) -> int:
    return max(1, math.ceil(value / multiple)) * multiple


def token_multiple(max_seqlen: int, tensor_parallel_size: int = 1) -> int:
    """What padded rows are a multiple of: the TP size (sequence parallelism splits the row evenly) times as much
    as keeps it within ``TOKEN_BUCKET`` and ``max_seqlen``."""
    return tensor_parallel_size * max(1, min(TOKEN_BUCKET, max_seqlen) // tensor_parallel_size)


def static_shape(batch, multiple: int) -> StaticShape:
    """The shape a packed micro batch (``collate_packed``) is padded to; ``multiple``: ``token_multiple(...)``."""
    real = batch["tokens"].shape[1]
    tokens = _round_up(real, multiple)
    segments = len(batch["cu_seqlens"]) - 1 + (tokens > real)  # the padding is a segment of its own
    segments = max(MIN_SEGMENTS, 1 << (segments - 1).bit_length())
    loss_tokens = int(np.count_nonzero(batch["loss_mask"].numpy() > 0))
    return StaticShape(tokens, segments, _round_up(loss_tokens, max(tokens // LOSS_BUCKETS, 1)))


def pad_to_static(batch, shape: StaticShape, pad_id: int = 0) -> StaticInputs:
    """``batch`` (a ``collate_packed`` row) padded to ``shape``; same loss and gradients as the batch itself.

    In numpy: this runs on the host while the GPU waits for the step's graph, and torch's per-operator overhead on
    small tensors is an order of magnitude more host time than numpy's.
    """
    real = batch["tokens"].shape[1]
    extra = shape.tokens - real
    if extra < 0:
        raise ValueError(f"a packed micro batch of {real} tokens does not fit the static shape {shape}")

    def padded(row: torch.Tensor, tail) -> torch.Tensor:
        values = row.numpy()
        out = np.empty((values.shape[0], shape.tokens), dtype=values.dtype)
        out[:, :real] = values
        out[:, real:] = tail
        return torch.from_numpy(out)

    bounds = batch["cu_seqlens"].numpy().astype(np.int32)
    segments = len(bounds) - 1 + (extra > 0)
    if segments > shape.segments:
        raise ValueError(f"a packed micro batch of {segments} segments does not fit the static shape {shape}")
    cu_seqlens = np.full(shape.segments + 1, shape.tokens if extra else bounds[-1], dtype=np.int32)
    cu_seqlens[: len(bounds)] = bounds  # then the padding's segment end, then empty segments
    index = np.flatnonzero(batch["loss_mask"].numpy().T.reshape(-1) > 0)  # into the (s, b)-flattened positions
    if len(index) > shape.loss_positions:
        raise ValueError(f"a packed micro batch of {len(index)} loss positions does not fit the static shape {shape}")
    loss_index = np.zeros(shape.loss_positions, dtype=np.int64)
    loss_index[: len(index)] = index
    weight = np.zeros(shape.loss_positions, dtype=np.float32)
    weight[: len(index)] = 1.0
    return StaticInputs(
        tokens=padded(batch["tokens"], pad_id),
        labels=padded(batch["labels"], pad_id),
        position_ids=padded(batch["position_ids"], np.arange(extra)),  # the padding's positions restart at 0
        cu_seqlens=torch.from_numpy(cu_seqlens),
        loss_index=torch.from_numpy(loss_index),
        loss_weight=torch.from_numpy(weight),
        loss_tokens=len(index),
    )


class _ShapeRunner:
    """Device buffers of one static shape, and its captured graph once there is one.

    The six input tensors are views of one device byte buffer, so a micro batch reaches the GPU in one host-to-device
    copy from one pinned block (six separate pinned copies cost six times the host overhead, while the GPU waits for
    the graph).
    """

    _ALIGN = 16  # bytes: every view starts where any dtype may

    def __init__(self, host: StaticInputs, device: torch.device):
        self._layout: List[Tuple[torch.dtype, torch.Size, int, int]] = []
        offset = 0
        for tensor in host.tensors():
            size = tensor.numel() * tensor.element_size()
            self._layout.append((tensor.dtype, tensor.shape, offset, size))
            offset += _round_up(size, self._ALIGN)
        self._pinned = device.type == "cuda"
        self._buffer = torch.empty(offset, dtype=torch.uint8, device=device)
        self.inputs = StaticInputs(*self._views(self._buffer), loss_tokens=host.loss_tokens)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.loss: Optional[torch.Tensor] = None
        """The graph's output: this micro batch's summed loss (a buffer the next replay overwrites)."""
        self.copy_in(host)

    def _views(self, buffer: torch.Tensor) -> List[torch.Tensor]:
        return [buffer[start:start + size].view(dtype).view(shape) for dtype, shape, start, size in self._layout]

    def copy_in(self, host: StaticInputs) -> None:
        # A fresh pinned block each time: the caching host allocator hands it out again only after the copy that
        # read it has run, so the next micro batch cannot overwrite data still on its way to the GPU.
        staging = torch.empty(self._buffer.shape, dtype=torch.uint8, pin_memory=self._pinned)
        raw = staging.numpy()  # numpy views and copies: far less host overhead than torch's on small tensors
        for (_, _, start, size), value in zip(self._layout, host.tensors()):
            raw[start:start + size] = value.numpy().reshape(-1).view(np.uint8)
        self._buffer.copy_(staging, non_blocking=self._pinned)
        self.inputs.loss_tokens = host.loss_tokens


class GraphedForwardBackward:
    """Forward+backward of packed micro batches through captured CUDA graphs (``capture=False``: the same path
    eagerly, for CPU tests). One instance per model; it keeps each shape's buffers and graph for the whole job.

    Give it the model through ``wrap``, which builds the DDP wrapper on the capture stream: autograd binds each
    parameter's gradient accumulator, which DDP creates and keeps, to the CUDA stream current when it was created,
    and a capture fails (``cudaErrorStreamCaptureImplicit``) unless the backward runs on that same stream.
    """

    def __init__(self, device: torch.device, *, max_seqlen: int, tensor_parallel_size: int = 1, pad_id: int = 0,
                 capture: Optional[bool] = None):
        self.model: Optional[torch.nn.Module] = None
        self.device = device
        self.max_seqlen = max_seqlen
        self.token_multiple = token_multiple(max_seqlen, tensor_parallel_size)
        self.pad_id = pad_id
        self.capture = device.type == "cuda" if capture is None else capture
        # Eager first runs and captures both run here (a side stream: captures cannot use the default one).
        self.stream = torch.cuda.Stream(device) if self.capture else None
        if self.capture:
            use_graph_safe_rng()
        self._runners: Dict[StaticShape, _ShapeRunner] = {}
        self._pool = None  # one memory pool for every shape's graph: only one of them runs at a time

    def wrap(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """``build()`` (e.g. ``wrap_for_training`` of the model) run on the capture stream; its result is the model
        this instance trains, and is returned."""
        if self.stream is None:
            self.model = build()
            return self.model
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.model = build()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return self.model

    def release(self) -> None:
        """Free every captured graph and its memory; call before destroying the process groups (NCCL's teardown can
        wait on communicators a live graph still references)."""
        for runner in self._runners.values():
            if runner.graph is not None:
                runner.graph.reset()
        self._runners.clear()
        self._pool = None
        if self.capture:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @property
    def captured_shapes(self) -> List[StaticShape]:
        return [shape for shape, runner in self._runners.items() if runner.graph is not None]

    def _body(self, inputs: StaticInputs) -> torch.Tensor:
        """The captured work: forward, summed loss, backward into the DDP gradient buffers."""
        from nemo_customizer.models.gpt import LossPositions
        from nemo_customizer.training.step import packed_seq_params

        token_losses = self.model(
            inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
            loss_mask=LossPositions(inputs.loss_index, inputs.loss_weight),
            packed_seq_params=packed_seq_params(inputs.cu_seqlens, self.max_seqlen),
        )
        total = token_losses.sum()
        total.backward()
        return total.detach()

    def _first_run(self, shape: StaticShape, runner: _ShapeRunner) -> torch.Tensor:
        """Eager on the static buffers, on the capture stream: it compiles kernels for these shapes and creates
        library state (cuBLAS workspaces, NCCL communicators), which must not happen inside a capture. Then the
        capture, which records the kernels without running them: the eager run's gradient is this micro batch's."""
        if not self.capture:
            return self._body(runner.inputs)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            loss = self._body(runner.inputs).clone()
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        for generator in rng_states_to_register():  # the states mcore's tracker swaps in (sequence parallelism)
            graph.register_generator_state(generator)
        torch.cuda.empty_cache()  # the eager run's blocks: the graph's pool is separate, do not hold both
        _barrier_of_captured_collectives()
        try:
            # thread_local: other threads (NCCL's watchdog polling its events, the autograd engine's device
            # thread) may make CUDA calls a capture in the default "global" mode would turn into an error.
            with torch.cuda.graph(graph, pool=self._pool, stream=self.stream, capture_error_mode="thread_local"):
                runner.loss = self._body(runner.inputs)
            _barrier_of_captured_collectives()
        except Exception as err:
            del self._runners[shape]
            raise RuntimeError(f"capturing the CUDA graph of a packed micro batch of shape {shape} failed: {err}; "
                               "set hyperparameters.cuda_graphs=false to train without graphs") from err
        self._pool = graph.pool()
        runner.graph = graph
        return loss

    def micro_batch(self, batch) -> Tuple[torch.Tensor, int]:
        """Forward+backward of one packed micro batch; returns (summed loss on the device, loss tokens)."""
        if self.model is None:
            raise RuntimeError("GraphedForwardBackward has no model: pass its builder to wrap() first")
        if int(batch["max_seqlen"]) > self.max_seqlen:
            raise ValueError(f"a packed example of {int(batch['max_seqlen'])} tokens is longer than max_seqlen "
                             f"{self.max_seqlen}")
        shape = static_shape(batch, self.token_multiple)
        host = pad_to_static(batch, shape, self.pad_id)
        runner = self._runners.get(shape)
        if runner is None:
            runner = self._runners[shape] = _ShapeRunner(host, self.device)
            return self._first_run(shape, runner), host.loss_tokens
        runner.copy_in(host)
        if runner.graph is None:  # capture=False
            return self._body(runner.inputs), host.loss_tokens
        runner.graph.replay()
        return runner.loss.clone(), host.loss_tokens


def _barrier_of_captured_collectives() -> None:
    """Line up the ranks whose collectives a graph captures (the tensor-parallel group, which sees the same micro
    batches) before and after a capture, so no rank captures while another still runs them eagerly."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.barrier(group=parallel_state.get_tensor_model_parallel_group())
