"""Cross-entropy and its logits gradient in one Triton kernel: one program per row, two passes over its logits.

The first pass keeps a running maximum and sum of exponentials per lane (no reduction inside the loop), the second
writes ``softmax - one_hot`` in the logits' dtype. With a softcap (Gemma 2's final-logit softcapping) each pass caps the
logits it loads, ``tanh(x / cap) * cap`` in fp32, and the gradient carries the cap's slope ``1 - tanh²``: no capped
copy of the logits is written. It runs faster than Inductor's kernels for the same function
(``models.loss._cross_entropy_and_grad``), whether those are compiled for one shape or for dynamic shapes; the step
profiles in docs/PERFORMANCE.md show its share. Only imported where Triton exists (CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
_FAR_BELOW = -1.0e30  # masked lanes: finite, so a lane that never sees a logit adds exp(-1e30 - max) = 0


@triton.jit
def _capped(x, SOFTCAP: tl.constexpr):
    """``tanh(x / SOFTCAP) * SOFTCAP`` (fp32), or ``x`` where SOFTCAP is 0 (no cap, compiled out); the tanh from one
    exponential of a non-positive number, which cannot overflow."""
    if SOFTCAP > 0:
        e = tl.exp(-2.0 * tl.abs(x) / SOFTCAP)
        t = (1.0 - e) / (1.0 + e)
        x = tl.where(x < 0, -t, t) * SOFTCAP
    return x


@triton.jit
def _cross_entropy_and_grad_kernel(logits_ptr, targets_ptr, losses_ptr, grad_ptr, vocab, logits_row_stride,
                                   grad_row_stride, BLOCK: tl.constexpr, FAR_BELOW: tl.constexpr,
                                   SOFTCAP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + row * logits_row_stride
    lane_max = tl.full([BLOCK], FAR_BELOW, tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, _capped(x, SOFTCAP), FAR_BELOW)  # a capped masked lane would count as a logit
        new_max = tl.maximum(lane_max, x)
        lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max)
        lane_max = new_max
    row_max = tl.max(lane_max, 0)
    log_normalizer = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), 0))
    target = tl.load(targets_ptr + row)
    tl.store(losses_ptr + row, log_normalizer - _capped(tl.load(logits + target).to(tl.float32), SOFTCAP))
    grad = grad_ptr + row * grad_row_stride
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = _capped(tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32), SOFTCAP)
        g = tl.exp(x - log_normalizer) - (cols == target).to(tl.float32)
        if SOFTCAP > 0:
            t = x / SOFTCAP
            g = g * (1.0 - t * t)
        tl.store(grad + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_and_grad_triton(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None):
    """fp32 cross-entropy per row of ``logits [n, vocab]`` (softcapped where ``softcap`` is given) and its gradient
    (softmax minus one-hot, times the cap's slope) in the logits' dtype: what ``models.loss._cross_entropy_and_grad``
    returns."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    if rows:
        _cross_entropy_and_grad_kernel[(rows,)](
            logits, targets.contiguous(), losses, grad, vocab, logits.stride(0), grad.stride(0), BLOCK=BLOCK,
            FAR_BELOW=_FAR_BELOW, SOFTCAP=float(softcap or 0.0), num_warps=8)
    return losses, grad
