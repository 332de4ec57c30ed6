"""Megatron optimizer (Adam with decoupled weight decay) and its warmup + cosine learning-rate schedule."""

from __future__ import annotations

from typing import List

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_customizer.compat import fused_optimizer_device_types, replace_inner_optimizer, skip_copy_of_masters_to_model
from nemo_customizer.config.schema import HyperparametersConfig
from nemo_customizer.distributed.collectives import all_reduce_sum_
from nemo_customizer.models.fused import triton_kernel
from nemo_customizer.training.bf16_adamw import Bf16AdamW, MasterAdamW


def build_optimizer(model_chunks: List[torch.nn.Module], hp: HyperparametersConfig, params_dtype: torch.dtype, *,
                    fused: bool = True):
    """Only parameters with ``requires_grad`` (the adapters, for LoRA) get optimizer state; with
    ``hp.use_distributed_optimizer`` it is sharded over the data-parallel ranks. ``fused``: torch's fused Adam kernel
    (see ``_use_fused_adam``); False keeps mcore's default (for comparisons).

    bf16 weights train with fp32 master copies (mcore's mixed precision) unless ``hp.fp32_master_weights`` is false:
    then mcore's plain optimizer steps the bf16 weights themselves with ``Bf16AdamW`` (bf16 moments, stochastic
    rounding). With fp32 masters on CUDA, ``MasterAdamW`` updates them and writes the bf16 weights in the same pass
    (``use_master_adamw``)."""
    masters = params_dtype != torch.bfloat16 or hp.fp32_master_weights
    config = OptimizerConfig(
        optimizer="adam",
        lr=hp.learning_rate,
        min_lr=hp.min_learning_rate,
        weight_decay=hp.weight_decay,
        adam_beta1=hp.adam_beta1,
        adam_beta2=hp.adam_beta2,
        clip_grad=hp.clip_grad,
        bf16=params_dtype == torch.bfloat16 and masters,
        params_dtype=params_dtype,
        use_distributed_optimizer=hp.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=False)
    if not masters:
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = part.optimizer
            replace_inner_optimizer(part, Bf16AdamW(inner.param_groups, lr=hp.learning_rate,
                                                    betas=(hp.adam_beta1, hp.adam_beta2), eps=inner.defaults["eps"],
                                                    weight_decay=hp.weight_decay))
    elif fused:
        _use_fused_adam(optimizer)
        if all(p.is_cuda for chunk in model_chunks for p in chunk.parameters()) and \
                triton_kernel("nemo_customizer.training.bf16_adamw_kernel", MasterAdamW.kernel_name) is not None:
            use_master_adamw(optimizer, hp)
    return optimizer


def use_master_adamw(optimizer, hp: HyperparametersConfig) -> None:
    """In each mixed-precision part of ``optimizer`` (mcore's ``Float16OptimizerWithFloat16Params``: bf16 weights,
    fp32 masters, not the distributed optimizer), step with ``MasterAdamW``, which writes the bf16 weights itself, and
    turn off mcore's copy of the masters into them. A part with masters of no bf16 weight keeps its Adam.

    Called by ``build_optimizer`` on CUDA; on a CPU the same update runs in torch (tests)."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(part, Float16OptimizerWithFloat16Params) or any(part.fp32_from_fp32_groups):
            continue
        model_params = {id(main): model for models, mains in zip(part.float16_groups, part.fp32_from_float16_groups)
                        for model, main in zip(models, mains)}
        inner = part.optimizer
        replace_inner_optimizer(part, MasterAdamW(inner.param_groups, model_params, lr=hp.learning_rate,
                                                  betas=(hp.adam_beta1, hp.adam_beta2), eps=inner.defaults["eps"],
                                                  weight_decay=hp.weight_decay))
        skip_copy_of_masters_to_model(part)


def torch_adams(optimizer) -> list:
    """``(index, inner torch Adam/AdamW)`` of each (chained) mcore optimizer that uses one; none under TE's or
    apex's fused Adam. ``index`` is the optimizer's key in a chained optimizer's state dict."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(index, member.optimizer) for index, member in enumerate(chained)
            if isinstance(getattr(member, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW, Bf16AdamW))]


def fused_adams(optimizer) -> list | None:
    """``(mcore optimizer part, its inner Adam)`` for every part of ``optimizer`` when each steps with torch's fused
    kernel or ``Bf16AdamW`` (both take a device-side ``grad_scale`` and ``found_inf``); None otherwise (a part
    without such an Adam, an unfused group, fp16 loss scaling)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = dict(torch_adams(optimizer))
    if len(inner) != len(parts) or any(getattr(part, "grad_scaler", None) is not None for part in parts):
        return None
    if not all(isinstance(adam, Bf16AdamW) or group.get("fused")
               for adam in inner.values() for group in adam.param_groups):
        return None
    return [(part, inner[index]) for index, part in enumerate(parts)]


def device_grad_norm(optimizer, device: torch.device) -> torch.Tensor:
    """The L2 norm mcore's ``get_grad_norm`` computes (the gradients each part steps, tensor-parallel duplicates
    counted once, squares summed over the part's statistics group), left on the device: no host sync."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads = part.get_main_grads_for_grad_norm() if part.get_parameters() else []
        squared = (torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().square().to(device) if grads
                   else torch.zeros((), dtype=torch.float32, device=device))
        total = total + all_reduce_sum_(squared, part.get_grad_stats_parallel_group())
    return total.sqrt()


def _use_fused_adam(optimizer) -> None:
    """Without TE or apex, mcore builds torch's AdamW with its default multi-tensor (foreach) implementation: every
    step makes several passes over the fp32 master weights and both moments (~1.2B parameters each for a 1B full
    fine-tune). torch's fused kernel updates each tensor in one pass. Its per-parameter ``step`` then lives on the
    parameter's device (see ``checkpointing._allocate_adam_state``)."""
    supported = set(fused_optimizer_device_types())
    for _, inner in torch_adams(optimizer):
        for group in inner.param_groups:
            # Contiguous only: the kernel walks parameter, gradient and moments as one flat layout.
            if group["params"] and all(p.device.type in supported and p.is_floating_point() and p.is_contiguous()
                                       for p in group["params"]):
                group["fused"], group["foreach"] = True, False


def build_scheduler(optimizer, hp: HyperparametersConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_learning_rate`` at the last step."""
    warmup = min(hp.warmup_steps, max(total_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else hp.learning_rate,
        max_lr=hp.learning_rate,
        min_lr=hp.min_learning_rate,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=hp.weight_decay,
        end_wd=hp.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
