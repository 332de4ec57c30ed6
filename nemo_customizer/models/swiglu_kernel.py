"""SwiGLU forward and backward as Triton kernels over the fused gate|up projection output.

Why not mcore's compiled ``swiglu_back``: it builds the input gradient as ``cat(d_gate, d_up)``, and Inductor's
kernel for that computes each output element from the index of the half it falls in, so it loads the incoming
gradient and the gate twice (7 tensor-sized passes over memory where 5 do). Here one program computes both halves of
a row block from one load of each, so the backward makes only the passes it needs (the step profiles in
docs/PERFORMANCE.md show its share). Forward and backward keep only the input, as mcore's does.
Only imported where Triton exists (CUDA builds of torch); ``models.swiglu`` computes the same in torch elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(x_ptr, out_ptr, width, x_row_stride, out_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + width + cols, mask=mask).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(grad_ptr, x_ptr, grad_x_ptr, width, grad_row_stride, x_row_stride, grad_x_row_stride,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    grad = tl.load(grad_ptr + row * grad_row_stride + cols, mask=mask).to(tl.float32)
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + width + cols, mask=mask).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    silu = gate * sigmoid
    grad_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))  # d silu(g)/dg = s (1 + g (1 - s))
    grad_up = grad * silu
    out = grad_x_ptr + row * grad_x_row_stride + cols
    tl.store(out, grad_gate.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(out + width, grad_up.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_forward_triton(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``x = [..., 2·width]`` (gate then up); ``[..., width]``, fp32 arithmetic."""
    width = x.shape[-1] // 2
    rows = _rows(x)
    out = torch.empty(rows.shape[0], width, dtype=x.dtype, device=x.device)
    if rows.shape[0] and width:
        _swiglu_forward_kernel[(rows.shape[0], triton.cdiv(width, BLOCK))](
            rows, out, width, rows.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], width)


def swiglu_backward_triton(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``swiglu_forward_triton`` with respect to ``x``, given the output's gradient ``grad``."""
    width = x.shape[-1] // 2
    rows, grad_rows = _rows(x), _rows(grad)
    grad_x = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] and width:
        _swiglu_backward_kernel[(rows.shape[0], triton.cdiv(width, BLOCK))](
            grad_rows, rows, grad_x, width, grad_rows.stride(0), rows.stride(0), grad_x.stride(0), BLOCK=BLOCK,
            num_warps=4)
    return grad_x.view(x.shape)
