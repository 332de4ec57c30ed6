"""Wrap a model for training with Megatron's mixed precision and DistributedDataParallel."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.tensor_parallel import layers as mcore_layers
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_customizer.compat import fuse_weight_grad_accumulation


def wrap_for_training(model: torch.nn.Module, config: TransformerConfig, *,
                      distributed_optimizer: bool = False, fp32_grads: bool = True) -> DistributedDataParallel:
    """bf16 (Float16Module) when the config says so, then mcore DDP with fp32 gradient buffers (``fp32_grads=False``:
    in the weights' dtype, for ``hyperparameters.fp32_master_weights=false``).

    ``distributed_optimizer``: gradients are reduce-scattered so each data-parallel rank keeps only its shard of
    the optimizer state (must match ``build_optimizer``).

    Only trainable parameters get gradient buffers, so a LoRA job keeps no gradient memory for the frozen base.
    The trained weights of mcore's linear layers add their gradients straight into those buffers
    (``accumulate_weight_grads_in_place``).
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
    accumulate_weight_grads_in_place(ddp)
    return ddp


class _WeightGradAccumulation:
    """What mcore's linear layers call, under ``gradient_accumulation_fusion``, to add a weight gradient into
    ``weight.main_grad`` (apex's ``fused_weight_gradient_mlp_cuda`` API): ``main_grad += grad_output.T @ input``,
    2-D ``[tokens, out]`` and ``[tokens, in]`` inputs."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        elif main_grad.is_cuda:  # bf16 inputs, fp32 accumulation in the GEMM's epilogue
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)
        else:  # CPU has no mixed-dtype GEMM
            main_grad.add_(grad_output.t() @ total_input)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32  # bf16/fp16 main_grad: same dtype as the inputs


def accumulate_weight_grads_in_place(model: torch.nn.Module) -> None:
    """Switch on mcore's gradient-accumulation fusion in every linear layer whose weight trains (full fine-tuning;
    LoRA's frozen base weights compute no weight gradient).

    Without it a layer's backward writes its weight gradient to a new tensor, and DDP's hook then adds that into the
    layer's ``main_grad`` buffer: one more pass over every trained weight's gradient (bf16 gradient read, buffer read
    and written) per micro batch (its cost in a full fine-tuning step: docs/PERFORMANCE.md). Fused, the GEMM adds its
    result into the buffer (``beta=1``) and returns a placeholder gradient that DDP's hook skips
    (``grad_added_to_main_grad``, reset by ``zero_grad_buffer``). mcore takes the GEMM from apex's
    ``fused_weight_gradient_mlp_cuda`` where installed, else from ``_WeightGradAccumulation``
    (``compat.fuse_weight_grad_accumulation``). Call after DDP has given each trained parameter its ``main_grad``.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, (mcore_layers.ColumnParallelLinear, mcore_layers.RowParallelLinear))
                and weight is not None and weight.requires_grad and hasattr(weight, "main_grad")):
            fuse_weight_grad_accumulation(module, _WeightGradAccumulation)


def finalize_without_token_division(model, num_tokens=None, **kwargs) -> None:
    """mcore's ``finalize_model_grads`` minus its division of the gradients by the global loss-token count.

    mcore's division reads the count on the host (``if num_tokens > 0``), which makes the CPU wait for the whole
    forward and backward before it can queue the optimizer step, and it is one more pass over every gradient.
    ``step._optimizer_step`` divides instead: inside fused Adam's ``grad_scale``, or on the host path by hand.
    """
    finalize_model_grads(model, None, **kwargs)
