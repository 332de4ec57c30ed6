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

``MasterAdamW`` is the same update for mixed precision's fp32 master weights and fp32 moments: it also writes each
updated master's bf16 model weight, which mcore would otherwise copy in a second pass.
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


def _adam(param, grad, exp_avg, exp_avg_sq, step, hyper, grad_scale, found_inf) -> torch.Tensor:
    """AdamW's arithmetic in fp32 for one flat tensor: updates the moments and ``step`` in place (unless
    ``found_inf``) and returns the updated weight in fp32. ``hyper``: fp32 ``[lr, beta1, beta2, eps, weight_decay]``."""
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
    exp_avg.copy_(torch.where(skip, exp_avg, m.to(exp_avg.dtype)))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v.to(exp_avg_sq.dtype)))
    step.copy_(torch.where(skip, step, new_step))
    return torch.where(skip, param.float(), updated)


def _update(param, grad, exp_avg, exp_avg_sq, step, hyper, grad_scale, found_inf):
    """One ``Bf16AdamW`` step of one flat bf16 tensor, in place."""
    updated = _adam(param, grad, exp_avg, exp_avg_sq, step, hyper, grad_scale, found_inf)
    noise = (torch.rand_like(updated) * 65536.0).to(torch.int32)
    # A skipped step's weight is already bf16: rounding it again leaves it as it is.
    param.copy_(stochastic_round_to_bf16(updated, noise))


def _update_master(param, grad, exp_avg, exp_avg_sq, step, hyper, grad_scale, found_inf, model_param):
    """One ``MasterAdamW`` step of one flat fp32 master tensor, in place, and its model copy."""
    param.copy_(_adam(param, grad, exp_avg, exp_avg_sq, step, hyper, grad_scale, found_inf))
    model_param.copy_(param)


class Bf16AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam for bf16 parameters (see the module docstring); torch AdamW's hyperparameters."""

    param_dtype = torch.bfloat16
    kernel_name = "adamw_bf16_update"
    """The update's Triton launcher in ``training.bf16_adamw_kernel`` (CUDA); ``update_on_host`` elsewhere."""
    update_on_host = staticmethod(_update)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__} takes no closure")
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.dtype != self.param_dtype for p in params):
                raise TypeError(f"{type(self).__name__} updates {self.param_dtype} parameters only")
            device = params[0].device
            beta1, beta2 = group["betas"]
            # One small host-to-device copy per group and step (pinned: no wait): the scheduler changes lr.
            hyper = upload(torch.tensor([group["lr"], beta1, beta2, group["eps"], group["weight_decay"]],
                                        dtype=torch.float32), device)
            scale = grad_scale if grad_scale is not None else torch.ones((), device=device)
            inf = found_inf if found_inf is not None else torch.zeros((), device=device)
            states = [self._state_of(param, device) for param in params]
            kernel = triton_kernel("nemo_customizer.training.bf16_adamw_kernel", self.kernel_name) \
                if device.type == "cuda" else None
            if kernel is not None:
                # The kernel reads the step count it is in; a skipped step (found_inf) leaves the counts as they were.
                # (A list of the increment, not the 0-d tensor itself: that overload reads it on the host.)
                torch._foreach_add_([state["step"] for state in states], [(inf <= 0).float()] * len(states))
            extras = self._extra_arguments(params, device, kernel is not None)
            for param, state, extra in zip(params, states, extras):
                flat = param if param.is_contiguous() else param.contiguous()  # updated in place: a flat view
                tensors = (flat.view(-1), param.grad.reshape(-1), state["exp_avg"].view(-1),
                           state["exp_avg_sq"].view(-1), state["step"], hyper, scale, inf)
                if kernel is not None:
                    kernel(*tensors, *extra)
                else:
                    self.update_on_host(*tensors, *extra)
                if flat is not param:
                    param.copy_(flat)

    def _extra_arguments(self, params, device: torch.device, on_kernel: bool) -> list:
        """Per parameter, what the update takes after the common tensors: the kernel's random seed."""
        if not on_kernel:
            return [()] * len(params)
        seeds = torch.randint(0, 2**62, (len(params),), dtype=torch.int64, device=device)
        return [(seeds[index:index + 1],) for index in range(len(params))]

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


class MasterAdamW(Bf16AdamW):
    """AdamW over fp32 master weights (mcore's mixed precision) that also writes each updated weight into its bf16
    model copy, in the same pass over memory.

    mcore's mixed-precision optimizer runs its inner Adam over the fp32 masters, then copies every master into the
    bf16 model weights: a second pass that reads 4 and writes 2 bytes per parameter. Here the update writes the
    model copy itself (rounded to nearest, as that copy does), and ``optim.build_optimizer`` turns mcore's copy off.
    On CUDA the update is a Triton kernel (one pass over the 28 bytes per parameter it must move; torch's fused Adam
    over the same tensors stays well under memory bandwidth: docs/PERFORMANCE.md). The state (``step``, fp32 ``exp_avg``, ``exp_avg_sq``) is torch AdamW's.

    ``model_params``: for each master parameter (by identity), its bf16 model parameter, contiguous, same shape.
    """

    param_dtype = torch.float32
    kernel_name = "adamw_master_update"
    update_on_host = staticmethod(_update_master)

    def __init__(self, params, model_params: dict, **hyperparameters):
        super().__init__(params, **hyperparameters)
        self.model_params = model_params

    def _extra_arguments(self, params, device: torch.device, on_kernel: bool) -> list:
        """Per parameter, its model copy as a flat view."""
        copies = []
        for param in params:
            model = self.model_params[id(param)]
            if not model.is_contiguous() or model.shape != param.shape:
                raise ValueError(f"MasterAdamW writes model copies in place: a {tuple(model.shape)} model copy of a "
                                 f"{tuple(param.shape)} master must be contiguous and of the same shape")
            copies.append((model.data.view(-1),))
        return copies
