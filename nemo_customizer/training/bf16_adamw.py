"""AdamW that updates bf16 weights in place: no fp32 master copy, bf16 moments, fp32 math, stochastic rounding.

Mixed precision keeps an fp32 copy of every trained weight, fp32 gradients and fp32 moments: 16 bytes per parameter
on top of the 2-byte bf16 weight, 128 GB for a full fine-tune of an 8B model. Here a step reads the bf16 weight,
bf16 gradient and bf16 moments, does Adam's arithmetic in fp32, and writes bf16 back: 8 bytes per parameter in all,
the weight included.

Rounding the updated weight to the nearest bf16 would lose every update smaller than half a bf16 step (2⁻⁹ of the
weight): with a learning rate of 1e-5 most of them. Stochastic rounding rounds up with probability equal to the
fraction of the step, so each update is kept on average (the weight's expected value is the fp32 result). The
moments round to nearest, as in ``torch.optim.AdamW`` with bf16 parameters.

The state is torch's AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``; ``step`` on the weight's device), so
checkpoints and mcore's optimizer wrappers treat it as one. Like torch's fused Adam it reads ``grad_scale`` (the
gradients are divided by it) and ``found_inf`` (non-zero: nothing changes, ``step`` included) from attributes on
the optimizer (``training.step._optimizer_step``), so a step needs no host sync.

On CUDA the update is a Triton kernel (``training.bf16_adamw_kernel``); elsewhere (CPU) ``_update`` below does the
same arithmetic.
"""

from __future__ import annotations

import torch

from nemo_customizer.models.fused import triton_kernel
from nemo_customizer.models.gpt import upload


def stochastic_round_to_bf16(value: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 ``value`` to bf16, rounding away from zero with probability (dropped low 16 bits) / 2¹⁶.

    ``noise``: int32 uniform in [0, 2¹⁶). bf16 is fp32's upper 16 bits; adding the noise to the lower 16 carries into
    the upper ones exactly that often (on the magnitude, the sign bit being separate), then the lower bits are cut.
    """
    bits = value.view(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _update(param, grad, exp_avg, exp_avg_sq, step, hyper, grad_scale, found_inf):
    """One AdamW step of one flat tensor, in place. ``hyper``: fp32 ``[lr, beta1, beta2, eps, weight_decay]``."""
    lr, beta1, beta2, eps, weight_decay = hyper.unbind()
    skip = found_inf > 0
    new_step = step + 1.0
    g = grad.float() / grad_scale
    m = exp_avg.float() * beta1 + g * (1.0 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1.0 - beta2)
    bias_correction1 = 1.0 - beta1 ** new_step
    bias_correction2_sqrt = (1.0 - beta2 ** new_step).sqrt()
    updated = param.float() * (1.0 - lr * weight_decay) - (lr / bias_correction1) * m / (
        v.sqrt() / bias_correction2_sqrt + eps)
    noise = (torch.rand_like(updated) * 65536.0).to(torch.int32)
    param.copy_(torch.where(skip, param, stochastic_round_to_bf16(updated, noise)))
    exp_avg.copy_(torch.where(skip, exp_avg, m.to(exp_avg.dtype)))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v.to(exp_avg_sq.dtype)))
    step.copy_(torch.where(skip, step, new_step))


class Bf16AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam for bf16 parameters (see the module docstring); torch AdamW's hyperparameters."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Bf16AdamW takes no closure")
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.dtype != torch.bfloat16 for p in params):
                raise TypeError("Bf16AdamW updates bf16 parameters only")
            device = params[0].device
            beta1, beta2 = group["betas"]
            # One small host-to-device copy per group and step (pinned: no wait): the scheduler changes lr.
            hyper = upload(torch.tensor([group["lr"], beta1, beta2, group["eps"], group["weight_decay"]],
                                        dtype=torch.float32), device)
            scale = grad_scale if grad_scale is not None else torch.ones((), device=device)
            inf = found_inf if found_inf is not None else torch.zeros((), device=device)
            states = [self._state_of(param, device) for param in params]
            kernel = _triton_update() if device.type == "cuda" else None
            if kernel is not None:
                # The kernel reads the step count it is in; a skipped step (found_inf) leaves the counts as they were.
                # (A list of the increment, not the 0-d tensor itself: that overload reads it on the host.)
                torch._foreach_add_([state["step"] for state in states], [(inf <= 0).float()] * len(states))
                seeds = torch.randint(0, 2**62, (len(params),), dtype=torch.int64, device=device)
            for index, (param, state) in enumerate(zip(params, states)):
                flat = param if param.is_contiguous() else param.contiguous()  # updated in place: a flat view
                tensors = (flat.view(-1), param.grad.reshape(-1), state["exp_avg"].view(-1),
                           state["exp_avg_sq"].view(-1), state["step"], hyper, scale, inf)
                if kernel is not None:
                    kernel(*tensors, seeds[index:index + 1])
                else:
                    _update(*tensors)
                if flat is not param:
                    param.copy_(flat)

    def _state_of(self, param: torch.Tensor, device: torch.device) -> dict:
        state = self.state[param]  # mcore's checkpoint loading may have created the moments only
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        elif state["step"].device != device:  # torch's load_state_dict leaves a non-fused step on the host
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        return state


def _triton_update():
    return triton_kernel("nemo_customizer.training.bf16_adamw_kernel", "adamw_bf16_update")
