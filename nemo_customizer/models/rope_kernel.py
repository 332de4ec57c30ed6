"""RoPE as a Triton kernel: one program per token rotates all its heads, reading query/key where mcore left them.

Why not ``torch.compile``: the rotation must serve a different packed token count every micro batch, and Inductor's
dynamic-shape kernel for it runs far below memory bandwidth, where a kernel compiled for one fixed shape does not.
This kernel takes any token count at the speed of the fixed-shape one (docs/PERFORMANCE.md profiles a step).

The backward is the inverse rotation (the transpose of a rotation), the same kernel with ``inverse=True``.
Only imported where Triton exists (CUDA builds of torch); ``models.rope`` falls back to the compiled function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_half_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, x_token_stride, x_head_stride, out_token_stride,
                        out_head_stride, cs_token_stride, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                        BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.arange(0, BLOCK_HEADS)[:, None]
    dim = tl.arange(0, BLOCK_HALF)[None, :]
    in_dim = dim < HALF
    mask = (head < heads) & in_dim
    x = x_ptr + token * x_token_stride + head * x_head_stride + dim
    x1 = tl.load(x, mask=mask).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask).to(tl.float32)
    cs = token * cs_token_stride + dim
    cos1 = tl.load(cos_ptr + cs, mask=in_dim).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs + HALF, mask=in_dim).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs, mask=in_dim).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs + HALF, mask=in_dim).to(tl.float32)
    if INVERSE:  # the transpose: d/dx of (x1 c1 - x2 s1, x2 c2 + x1 s2)
        out1 = x1 * cos1 + x2 * sin2
        out2 = x2 * cos2 - x1 * sin1
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    out = out_ptr + token * out_token_stride + head * out_head_stride + dim
    tl.store(out, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


def rotate_half_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x [t, heads, head_dim]`` (any token/head strides) rotated by ``cos``/``sin [t, 1, head_dim]``; contiguous.

    Arithmetic in fp32, one rounding to ``x.dtype`` at the end (what Inductor's kernel does).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    tokens, heads, head_dim = x.shape
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    half = head_dim // 2
    _rotate_half_kernel[(tokens,)](
        x, cos, sin, out, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        HALF=half, BLOCK_HEADS=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half),
        INVERSE=inverse, num_warps=4,
    )
    return out
