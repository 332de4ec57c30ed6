"""``Bf16AdamW``'s update as a Triton kernel: one pass over weight, gradient and moments at memory bandwidth.

Why not ``torch.compile`` of ``bf16_adamw._update``: its dynamic-shape kernel reached about half of the H200's
bandwidth, and a third of it in the training step (20.5 ms of a 1B full fine-tuning step for what reads 8 and
writes 6 bytes per parameter, ~4 ms of traffic). This kernel is the same arithmetic, written for any tensor size.

Stochastic rounding draws from Philox (``tl.randint``) keyed by a per-tensor seed that the caller draws from torch's
CUDA generator, so the numbers are checkpointed and replayed with that generator, as ``torch.rand_like`` was.
Only imported where Triton exists (CUDA builds of torch); without it ``bf16_adamw._update`` runs in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _adamw_bf16_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, step_ptr, hyper_ptr, grad_scale_ptr,
                       found_inf_ptr, seed_ptr, BLOCK: tl.constexpr):
    if tl.load(found_inf_ptr) > 0:  # a non-finite step: nothing changes (the caller leaves ``step`` as it was)
        return
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    lr = tl.load(hyper_ptr)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3)
    weight_decay = tl.load(hyper_ptr + 4)
    step = tl.load(step_ptr)  # already counts this step
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) / tl.load(grad_scale_ptr)
    m = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32) * beta1 + g * (1.0 - beta1)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32) * beta2 + g * g * (1.0 - beta2)
    p = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    updated = p * (1.0 - lr * weight_decay) - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    # Stochastic rounding (``bf16_adamw.stochastic_round_to_bf16``): add 16 random low bits, then cut them.
    noise = (tl.randint(tl.load(seed_ptr), offsets) & 0xFFFF).to(tl.int32)
    bits = updated.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(param_ptr + offsets, rounded.to(tl.bfloat16), mask=mask)
    tl.store(exp_avg_ptr + offsets, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)


def adamw_bf16_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      step: torch.Tensor, hyper: torch.Tensor, grad_scale: torch.Tensor, found_inf: torch.Tensor,
                      seed: torch.Tensor) -> None:
    """One AdamW step of flat contiguous CUDA tensors, in place; ``step`` must already count this step (the caller
    increments it unless ``found_inf``). ``hyper``: fp32 ``[lr, beta1, beta2, eps, weight_decay]``; ``seed``: a
    one-element int64 device tensor."""
    numel = param.numel()
    if numel == 0:
        return
    _adamw_bf16_kernel[(triton.cdiv(numel, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, numel, step, hyper, grad_scale, found_inf, seed, BLOCK=BLOCK, num_warps=8)
