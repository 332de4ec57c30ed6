"""What the training step uses of megatron-core 0.16.x's optimizer wrappers beyond ``step()``.

mcore's ``MegatronOptimizer.step()`` is ``prepare_grads()`` (unscale, fp16 inf/nan check), the gradient norm and
clipping, then ``step_with_ready_grads()`` (the inner torch optimizer's step, then the copy of fp32 masters into the
model weights). ``training.step`` runs those parts itself, so that it can divide by the loss-token count, check for
non-finite values and keep the clip factor on the device; ``training.optim`` swaps the inner torch optimizer.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import optimizer as mcore_optimizer


def prepare_grads(optimizer) -> bool:
    """The first part of megatron-core 0.16.x's ``MegatronOptimizer.step()`` (also ``ChainedOptimizer``'s):
    gradients ready for the update; True when fp16 loss scaling found inf/nan (the update must be skipped)."""
    return optimizer.prepare_grads()


def step_with_ready_grads(optimizer) -> bool:
    """The last part of megatron-core 0.16.x's ``MegatronOptimizer.step()``: the inner optimizer's update on the
    prepared (divided, clipped) gradients, then the copy of fp32 masters into the model weights. Returns whether
    the update was applied."""
    return optimizer.step_with_ready_grads()


def clip_grads_by_total_norm(part, total_norm: float) -> None:
    """Scale the gradients of ``part`` (one mcore optimizer of a chain) by ``clip_grad / total_norm`` when that is
    below 1, as megatron-core 0.16.x's ``step()`` does with ``clip_grad_by_total_norm_fp32``.

    The function is looked up on mcore's ``optimizer`` module at each call (where ``step()`` finds it), so the CPU
    adaptations' replacement (``megatron_cpu.clip_grad_by_total_norm_on_cpu``) applies while they are live.
    """
    mcore_optimizer.clip_grad_by_total_norm_fp32(part.get_parameters(), part.config.clip_grad, total_norm,
                                                 part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def replace_inner_optimizer(part, inner: torch.optim.Optimizer) -> None:
    """Make ``part`` (an mcore optimizer wrapper, not a chain) step with ``inner`` instead of the torch optimizer it
    built.

    megatron-core 0.16.x keeps that optimizer in ``part.optimizer``: ``step_with_ready_grads`` steps it, and the
    param groups (learning-rate schedule) and state (checkpoints) are read through it. ``inner`` must be built on
    the same param groups.
    """
    part.optimizer = inner


def skip_copy_of_masters_to_model(part) -> None:
    """Turn off the copy of fp32 master weights into the bf16 model weights after each update of ``part`` (mcore's
    ``Float16OptimizerWithFloat16Params``), for an inner optimizer that writes the model weights itself
    (``training.bf16_adamw.MasterAdamW``).

    megatron-core 0.16.x's ``step_with_ready_grads`` calls the private ``_copy_main_params_to_model_params``;
    left on, it would rewrite every bf16 weight a second time (one more pass over all trained weights per step).
    """
    part._copy_main_params_to_model_params = _model_weights_written_by_the_update


def _model_weights_written_by_the_update() -> None:
    """Stands in for mcore's copy of the fp32 masters into the model weights: the update already wrote them."""
