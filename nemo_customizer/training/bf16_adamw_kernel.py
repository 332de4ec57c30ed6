"""``Bf16AdamW``'s and ``MasterAdamW``'s updates as Triton kernels: one pass over weight, gradient and moments (and
the model copy of an fp32 master weight) at memory bandwidth.

Why not ``torch.compile`` of ``bf16_adamw._update``: its dynamic-shape kernel runs far below memory bandwidth, and
further below inside the training step, for an update that only has to read 8 and write 6 bytes per parameter
(docs/PERFORMANCE.md). This kernel is the same arithmetic, written for any tensor size.

Stochastic rounding draws from Philox (``tl.randint``) keyed by a per-tensor seed that the caller draws from torch's
CUDA generator, so the numbers are checkpointed and replayed with that generator, as ``torch.rand_like`` was.
Only imported where Triton exists (CUDA builds of torch); without it ``bf16_adamw._update`` and
``_update_master`` run in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SLICE = 1024
"""Elements per slice. A program updates eight slices (``BLOCK`` elements), each with 16 of the 128 random bits of
one Philox draw per lane."""
BLOCK = 8 * SLICE
MASTER_BLOCK = 2048
"""Elements per program of the fp32-master kernel (no random bits: one slice per program)."""


@triton.jit
def _hyperparameters(step_ptr, hyper_ptr, grad_scale_ptr):
    """``(1 / grad_scale, lr, beta1, beta2, eps, weight_decay, bias correction 1, sqrt of bias correction 2)``."""
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    step = tl.load(step_ptr)  # already counts this step
    return (1.0 / tl.load(grad_scale_ptr), tl.load(hyper_ptr), beta1, beta2, tl.load(hyper_ptr + 3),
            tl.load(hyper_ptr + 4), 1.0 - tl.exp(step * tl.log(beta1)), tl.sqrt(1.0 - tl.exp(step * tl.log(beta2))))


@triton.jit
def _adam(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, inv_grad_scale, lr, beta1, beta2, eps,
          weight_decay, bias_correction1, bias_correction2_sqrt):
    """AdamW's arithmetic in fp32 for one slice: stores the moments, returns the updated weight (fp32)."""
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * inv_grad_scale
    m = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32) * beta1 + g * (1.0 - beta1)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32) * beta2 + g * g * (1.0 - beta2)
    p = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(exp_avg_ptr + offsets, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    return p * (1.0 - lr * weight_decay) - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)


@triton.jit
def _update_slice(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, numel, random_bits, inv_grad_scale,
                  lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt):
    mask = offsets < numel
    updated = _adam(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, inv_grad_scale, lr, beta1,
                    beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt)
    # Stochastic rounding (``bf16_adamw.stochastic_round_to_bf16``): add 16 random low bits, then cut them.
    noise = (random_bits & 0xFFFF).to(tl.int32)
    bits = updated.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(param_ptr + offsets, rounded.to(tl.bfloat16), mask=mask)


@triton.jit
def _adamw_bf16_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, step_ptr, hyper_ptr, grad_scale_ptr,
                       found_inf_ptr, seed_ptr, SLICE: tl.constexpr):
    if tl.load(found_inf_ptr) > 0:  # a non-finite step: nothing changes (the caller leaves ``step`` as it was)
        return
    hyper = _hyperparameters(step_ptr, hyper_ptr, grad_scale_ptr)
    tensors = (param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr)
    lanes = tl.arange(0, SLICE)
    program = tl.program_id(0).to(tl.int64)
    # One Philox draw per lane: four 32-bit numbers, eight 16-bit noises, one per slice. Drawing 32 bits for every
    # element (tl.randint) kept the kernel compute-bound on Philox, at half the memory bandwidth.
    draws = tl.randint4x(tl.load(seed_ptr), program * SLICE + lanes)
    first = program * (8 * SLICE) + lanes
    for index in tl.static_range(8):
        bits = draws[index // 2] >> (16 * (index % 2))
        _update_slice(*tensors, first + index * SLICE, numel, bits, *hyper)


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
        param, grad, exp_avg, exp_avg_sq, numel, step, hyper, grad_scale, found_inf, seed, SLICE=SLICE, num_warps=4)


@triton.jit
def _adamw_master_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, model_ptr, numel, step_ptr, hyper_ptr,
                         grad_scale_ptr, found_inf_ptr, BLOCK: tl.constexpr):
    if tl.load(found_inf_ptr) > 0:
        return
    hyper = _hyperparameters(step_ptr, hyper_ptr, grad_scale_ptr)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    updated = _adam(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, *hyper)
    tl.store(param_ptr + offsets, updated, mask=mask)
    tl.store(model_ptr + offsets, updated.to(model_ptr.dtype.element_ty), mask=mask)  # round to nearest, as copy_


def adamw_master_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        step: torch.Tensor, hyper: torch.Tensor, grad_scale: torch.Tensor, found_inf: torch.Tensor,
                        model_param: torch.Tensor) -> None:
    """``adamw_bf16_update`` for an fp32 master weight with fp32 moments (``MasterAdamW``), which also writes the
    updated weight into ``model_param``, its bf16 model copy (flat, contiguous), in the same pass."""
    numel = param.numel()
    if numel == 0:
        return
    _adamw_master_kernel[(triton.cdiv(numel, MASTER_BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, model_param, numel, step, hyper, grad_scale, found_inf, BLOCK=MASTER_BLOCK,
        num_warps=8)
