"""Per-row FP8 quantization as one Triton kernel: each row's absolute maximum, its scale and the e4m3 cast.

In torch it is three passes over the activation (abs-max reduction, division, cast) plus temporaries; here one
program reads its row twice (once for the maximum, once to cast), writes the FP8 row and one fp32 scale. The input
and input-gradient GEMMs of every frozen FP8 linear quantize their left operand with it (``models.fp8_linear``).
Only imported where Triton exists (CUDA builds of torch); ``models.fp8_linear`` computes the same in torch elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
E4M3_MAX = 448.0
TINY = 1e-12


@triton.jit
def _row_block(x_ptr, multiplier_ptr, row, x_row_stride, col, mask, HAS_MULTIPLIER: tl.constexpr):
    """One block of a row in fp32, times the multiplier's columns when there is one."""
    x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULTIPLIER:
        x = x * tl.load(multiplier_ptr + col, mask=mask, other=0.0)
    return x


@triton.jit
def _quantize_rows_kernel(x_ptr, multiplier_ptr, q_ptr, scale_ptr, cols, x_row_stride, q_row_stride,
                          HAS_MULTIPLIER: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                          TINY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        col = start + offsets
        x = _row_block(x_ptr, multiplier_ptr, row, x_row_stride, col, col < cols, HAS_MULTIPLIER)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), TINY) / FP8_MAX
    tl.store(scale_ptr + row, scale)
    for start in range(0, cols, BLOCK):  # the row again (from L2 at these widths), now cast
        col = start + offsets
        mask = col < cols
        x = _row_block(x_ptr, multiplier_ptr, row, x_row_stride, col, mask, HAS_MULTIPLIER)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * q_row_stride + col, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_triton(x: torch.Tensor, multiplier: torch.Tensor | None = None):
    """``x [rows, cols]`` (times ``multiplier [cols]`` when given) → ``(q [rows, cols] e4m3, scale [rows, 1] fp32)``
    with ``q · scale ≈ x``, ``scale = max(amax, tiny) / 448`` per row. Arithmetic in fp32."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    has_multiplier = multiplier is not None
    _quantize_rows_kernel[(rows,)](
        x, multiplier if has_multiplier else x, q, scale, cols, x.stride(0), q.stride(0),
        HAS_MULTIPLIER=has_multiplier, BLOCK=min(BLOCK, triton.next_power_of_2(cols)), FP8_MAX=E4M3_MAX, TINY=TINY)
    return q, scale
