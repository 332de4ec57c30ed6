"""Every patch and private access of megatron-core and torch that nemo_customizer makes, in one place.

Supported: megatron-core 0.16.x and torch 2.6 or later. Each adaptation is a named function or class whose
docstring says what it targets and what breaks without it; ``_check.REQUIREMENTS`` lists the symbols they rely on.

- ``megatron_cpu``: the CPU adaptations, entered for a CPU job and undone after it (``enter_cpu_adaptations``).
- ``megatron_optimizer``: the parts of mcore's optimizer step the training step runs itself; swapping the inner
  torch optimizer.
- ``megatron_checkpointing``: an in-process results queue for mcore's checkpoint writer.
- ``megatron_model``: public hooks in place of GPTModel's private pre/post-processing; gradient-accumulation
  fusion without apex.
- ``torch_private``: torch's fused-kernel device list, fused Adam's ``grad_scale``/``found_inf``, a traced
  ``torch.cuda.synchronize`` for measurements.

Importing this package imports neither torch nor megatron. The first name taken from it (``from
nemo_customizer.compat import prepare_grads``) runs ``check_compat``, which raises ``MegatronCompatError`` naming
every missing symbol, then imports the module that defines the name.
"""

from __future__ import annotations

import importlib

from nemo_customizer.compat._check import SUPPORTED_VERSIONS, MegatronCompatError, check_compat

_DEFINED_IN = {
    "CpuAdaptations": "megatron_cpu",
    "CudaToCpuTorch": "megatron_cpu",
    "cpu_adaptations": "megatron_cpu",
    "cpu_adaptations_active": "megatron_cpu",
    "enter_cpu_adaptations": "megatron_cpu",
    "exit_all_cpu_adaptations": "megatron_cpu",
    "clip_grads_by_total_norm": "megatron_optimizer",
    "prepare_grads": "megatron_optimizer",
    "replace_inner_optimizer": "megatron_optimizer",
    "skip_copy_of_masters_to_model": "megatron_optimizer",
    "step_with_ready_grads": "megatron_optimizer",
    "use_in_process_checkpoint_results_queue": "megatron_checkpointing",
    "GPTModelHooks": "megatron_model",
    "fuse_weight_grad_accumulation": "megatron_model",
    "adam_gradient_scaling": "torch_private",
    "count_cuda_synchronize_callers": "torch_private",
    "fused_optimizer_device_types": "torch_private",
}

__all__ = ["MegatronCompatError", "SUPPORTED_VERSIONS", "check_compat", *_DEFINED_IN]


def __getattr__(name):
    module = _DEFINED_IN.get(name)
    if module is None:
        raise AttributeError(f"module 'nemo_customizer.compat' has no attribute {name!r}")
    check_compat()
    return getattr(importlib.import_module(f"nemo_customizer.compat.{module}"), name)
