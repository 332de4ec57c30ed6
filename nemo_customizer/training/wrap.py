"""Wrap a model for training with Megatron's mixed precision and DistributedDataParallel."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig


def wrap_for_training(model: torch.nn.Module, config: TransformerConfig, *,
                      distributed_optimizer: bool = False, fp32_grads: bool = True) -> DistributedDataParallel:
    """bf16 (Float16Module) when the config says so, then mcore DDP with fp32 gradient buffers (``fp32_grads=False``:
    in the weights' dtype, for ``hyperparameters.fp32_master_weights=false``).

    ``distributed_optimizer``: gradients are reduce-scattered so each data-parallel rank keeps only its shard of
    the optimizer state (must match ``build_optimizer``).

    Only trainable parameters get gradient buffers, so a LoRA job keeps no gradient memory for the frozen base.
    Also wires mcore's schedule hooks: gradient finalization (DP all-reduce, SP norm grads; the per-token division
    is left to the optimizer step, see ``finalize_without_token_division``) and no_sync for gradient accumulation.
    """
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=fp32_grads, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=distributed_optimizer),
        module=model,
    )
    config.finalize_model_grads_func = finalize_without_token_division
    config.no_sync_func = ddp.no_sync
    return ddp


def finalize_without_token_division(model, num_tokens=None, **kwargs) -> None:
    """mcore's ``finalize_model_grads`` minus its division of the gradients by the global loss-token count.

    mcore's division reads the count on the host (``if num_tokens > 0``), which makes the CPU wait for the whole
    forward and backward before it can queue the optimizer step, and it is one more pass over every gradient.
    ``step._optimizer_step`` divides instead: inside fused Adam's ``grad_scale``, or on the host path by hand.
    """
    finalize_model_grads(model, None, **kwargs)
