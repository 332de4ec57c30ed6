"""FP8 for the frozen base of a LoRA job (``precision=fp8``): frozen linears held once in float8 e4m3.

Each frozen column- or row-parallel linear of the decoder layers (the base inside a LoRA wrapper, and the linears
that carry no adapter) is replaced, once the model is built and LoRA attached, by :class:`Fp8FrozenLinear`:

- its weight ``W [out, in]`` (this rank's shard) is quantized once per output row, ``W ≈ Wq · sw[:, None]`` with
  ``sw = amax(row) / 448`` in fp32, and the bf16 weight is freed. ``Wq`` is kept twice, as ``[out, in]`` and as its
  transpose ``[in, out]``, because each GEMM needs its second operand column-major: two bytes per weight, what the
  bf16 weight took.
- forward ``y = x Wᵀ``: ``x`` is quantized per token (row), then one ``torch._scaled_mm`` with rowwise scales
  ``scale_a = sx [tokens, 1]`` and ``scale_b = swᵀ [1, out]`` (fp32 accumulation, bf16 out).
- input gradient ``dx = dy W = (dy · sw[None, :]) Wq``: the weight's row scales fold into the gradient before it is
  quantized per token, so the second operand is ``Wq`` itself with unit scales. No weight gradient (frozen), and
  no activation is saved for backward.

LoRA adapters, norms, attention, the embedding, the LM head and the loss stay bf16. Tensor parallelism keeps
megatron's communication: a column-parallel input is copied to (all-gathered over the sequence under SP) every
rank, a row-parallel output is all-reduced (reduce-scattered under SP). A row-parallel weight's row scales are
taken over this rank's input columns, so TP=N rounds slightly differently from TP=1.

On CUDA the GEMMs need compute capability 9.0 (rowwise-scaled ``_scaled_mm``) and every linear's local sizes in
multiples of 16; the per-row quantization is one Triton kernel (``models.fp8_kernel``). Elsewhere, and wherever
``simulate=True``, the same arithmetic is simulated: real float8 e4m3 casts, an fp32 matmul, the scales applied
after it, so CPU tests check the rounding.

Frozen FP8 weights are not saved: training checkpoints hold only what trains (``training.checkpointing``), and
exports re-read the bf16 base from the HF checkpoint (``export.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from nemo_customizer.config import ConfigError
from nemo_customizer.models.fused import triton_kernel

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
"""The largest finite float8 e4m3fn value: a row's absolute maximum maps onto it."""
TINY = 1e-12
"""Floor of a row's absolute maximum, so an all-zero row gets a finite scale (and quantizes to zeros)."""
MIN_CAPABILITY = (9, 0)
"""Rowwise-scaled ``torch._scaled_mm`` runs on Hopper (9.0) and newer."""


def fp8_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why ``precision=fp8`` cannot train on ``device``, or None when it can."""
    if device.type != "cuda":
        return "its FP8 GEMMs need a CUDA GPU and this job runs on the CPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"its rowwise-scaled FP8 GEMMs (torch._scaled_mm) need a GPU of compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Hopper, Blackwell), and this one has "
                f"{capability[0]}.{capability[1]}")
    return None


def quantize_rows_reference(x: torch.Tensor, multiplier: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, cols]`` (times ``multiplier [cols]``) → ``(q e4m3 [rows, cols], scale fp32 [rows, 1])``, ``q · scale
    ≈ x``: ``scale = max(amax, TINY) / 448``, ``q = e4m3(clamp(x / scale, ±448))``, in fp32 (the Triton kernel's
    arithmetic)."""
    x = x.float()
    if multiplier is not None:
        x = x * multiplier.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=TINY) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_rows(x: torch.Tensor, multiplier: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_reference` as one Triton kernel on CUDA, in torch elsewhere."""
    kernel = triton_kernel("nemo_customizer.models.fp8_kernel", "quantize_rows_triton") if x.is_cuda else None
    if kernel is None:
        return quantize_rows_reference(x, multiplier)
    return kernel(x, multiplier)


class _FrozenFp8Matmul(torch.autograd.Function):
    """``x [..., in] → x Wᵀ [..., out]`` through ``layer``'s FP8 weight; the backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Fp8FrozenLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        out = layer.forward_gemm(x.reshape(-1, x.shape[-1]))  # (tokens, out)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        grad_input = ctx.layer.input_grad_gemm(grad.reshape(-1, grad.shape[-1]))  # (tokens, in)
        return grad_input.view(ctx.input_shape).to(ctx.input_dtype), None


class Fp8FrozenLinear(torch.nn.Module):
    """A frozen megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` with its weight in FP8 (module docstring).

    Called like the linear it replaces: ``(output, output_bias)``, megatron's ``skip_bias_add`` honoured.
    ``simulate``: the CPU arithmetic (fp32 matmul of the e4m3 values) instead of ``torch._scaled_mm``.
    """

    def __init__(self, base: torch.nn.Module, *, simulate: bool):
        super().__init__()
        if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            raise TypeError(f"FP8 replaces megatron's column/row-parallel linears, not {type(base).__name__}")
        self.parallel_mode = "column" if isinstance(base, ColumnParallelLinear) else "row"
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        self.skip_bias_add = bool(getattr(base, "skip_bias_add", False))
        self.simulate = simulate
        self.bias = base.bias  # frozen bf16 (Qwen2's q/k/v), or None
        weight = base.weight.detach()
        self.out_features, self.in_features = weight.shape  # this rank's shard
        q, scale = quantize_rows_reference(weight)
        self.register_buffer("weight_fp8", q, persistent=False)  # (out, in): the forward's column-major Wqᵀ
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous(), persistent=False)  # (1, out) fp32
        # (in, out): the input-gradient GEMM's column-major Wq; the simulated path reads weight_fp8 for both.
        self.register_buffer("weight_fp8_t", None if simulate else q.t().contiguous(), persistent=False)
        self.register_buffer("unit_scale", torch.ones(1, self.in_features, device=weight.device), persistent=False)

    # --- the two GEMMs: 2-D operands ------------------------------------------------------------------------------

    def forward_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """``x [tokens, in] → x Wᵀ [tokens, out]`` (bf16, or fp32 simulated)."""
        xq, sx = quantize_rows_reference(x) if self.simulate else quantize_rows(x)
        if self.simulate:
            return (xq.float() @ self.weight_fp8.float().t()) * sx * self.weight_scale
        return torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                                out_dtype=torch.bfloat16)

    def input_grad_gemm(self, grad: torch.Tensor) -> torch.Tensor:
        """``dy [tokens, out] → dy W [tokens, in]``: ``(dy · sw)`` quantized per token, times ``Wq``."""
        multiplier = self.weight_scale.view(-1)
        gq, sg = quantize_rows_reference(grad, multiplier) if self.simulate else quantize_rows(grad, multiplier)
        if self.simulate:
            return (gq.float() @ self.weight_fp8.float()) * sg
        return torch._scaled_mm(gq, self.weight_fp8_t.t(), scale_a=sg, scale_b=self.unit_scale,
                                out_dtype=torch.bfloat16)

    # --- the linear, with megatron's communication ----------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.parallel_mode == "column":
            # The backward of either region sums the input gradient over TP (reduce-scatters it under SP).
            x = gather_from_sequence_parallel_region(x) if self.sequence_parallel \
                else copy_to_tensor_model_parallel_region(x)
            out = _FrozenFp8Matmul.apply(x, self)
            if self.bias is not None and not self.skip_bias_add:
                out = out + self.bias
        else:
            partial = _FrozenFp8Matmul.apply(x, self)  # x is this rank's input shard: a partial sum
            out = reduce_scatter_to_sequence_parallel_region(partial) if self.sequence_parallel \
                else reduce_from_tensor_model_parallel_region(partial)
            if self.bias is not None and not self.skip_bias_add:
                out = out + self.bias
        return out, (self.bias if self.skip_bias_add else None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Nothing: the frozen base is re-read from the HF checkpoint, never saved in FP8."""
        return {}

    def _apply(self, fn, recurse=True):
        # Keep every buffer's dtype: Float16Module calls ``module.bfloat16()``, which would turn the FP8 weight and
        # its fp32 scales into bf16. Moves between devices still apply.
        dtypes = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None}
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            moved = self._buffers[name]
            if moved.dtype != dtype:
                self._buffers[name] = before[name].to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.parallel_mode}-parallel, in={self.in_features}, out={self.out_features} (this rank), "
                f"e4m3 with per-row scales{', simulated' if self.simulate else ''}")


def convert_frozen_linears_to_fp8(model: torch.nn.Module, *, simulate: Optional[bool] = None) -> int:
    """Replace every frozen column/row-parallel linear in ``model.decoder.layers`` (a LoRA wrapper's base included)
    by an :class:`Fp8FrozenLinear`; returns how many. The LM head and embedding stay bf16; trained linears are left.

    ``simulate``: None picks the simulated arithmetic off CUDA and ``torch._scaled_mm`` on CUDA. On CUDA a linear
    whose local sizes are not multiples of 16 (what ``_scaled_mm`` needs) raises ``ConfigError``.
    """
    converted = 0
    for layer in model.decoder.layers:
        for name, module in list(layer.named_modules()):
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                continue
            weight = getattr(module, "weight", None)
            if weight is None or weight.requires_grad:
                continue
            on_gpu = not (simulate if simulate is not None else not weight.is_cuda)
            out_features, in_features = weight.shape
            if on_gpu and (out_features % 16 or in_features % 16):
                raise ConfigError(f"precision=fp8: {name} of layer {layer.layer_number} is [{out_features}, "
                                  f"{in_features}] on this rank, and FP8 GEMMs need both sizes in multiples of 16; "
                                  "use precision=bf16 for this model (or another tensor_parallel_size).")
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, Fp8FrozenLinear(module, simulate=not on_gpu))
            converted += 1
    return converted
