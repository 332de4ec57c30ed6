"""The megatron-core and torch symbols the adaptations in ``nemo_customizer.compat`` rely on, and their check.

The check looks symbols up by name (and a callable's parameters where a patch passes or accepts them), so a
megatron-core release that keeps them passes and one that moved them fails at once, naming each missing symbol and
the adaptation that needs it, instead of failing mid-job.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, List, Optional, Sequence, Tuple

SUPPORTED_VERSIONS = "megatron-core 0.16.x (tested with 0.16.1) and torch 2.6 or later"


class MegatronCompatError(ImportError):
    """The installed megatron-core or torch lacks a symbol an adaptation in ``nemo_customizer.compat`` needs."""


@dataclass(frozen=True)
class Requirement:
    """One symbol an adaptation relies on."""

    module: str
    """The module that holds it, e.g. ``megatron.core.tensor_parallel.random``."""
    symbol: str
    """Dotted path inside ``module``, e.g. ``CudaRNGStatesTracker.fork``. A class name followed by ``()`` is looked
    up on an instance built without arguments (attributes its ``__init__`` sets)."""
    patch: str
    """The adaptation that needs it (``module::function`` under ``nemo_customizer.compat``)."""
    parameters: Tuple[str, ...] = ()
    """Parameters the symbol (a callable) must accept."""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.symbol}"


_CPU = "megatron_cpu::enter_cpu_adaptations"
_RANDOM = "megatron.core.tensor_parallel.random"
_OPTIMIZER = "megatron.core.optimizer.optimizer"

REQUIREMENTS: Tuple[Requirement, ...] = (
    # megatron_cpu: a CPU job's adaptations
    Requirement("torch.cuda", "current_device", _CPU),
    Requirement("torch.cuda", "synchronize", _CPU),
    Requirement("torch", "Tensor.cuda", "megatron_cpu::tied_embedding_setup_on_cpu"),
    Requirement(_RANDOM, "_get_cuda_rng_state", "megatron_cpu::cpu_get_rng_state", ("device", "clone", "graph_safe")),
    Requirement(_RANDOM, "_set_cuda_rng_state", "megatron_cpu::cpu_set_rng_state",
                ("new_state", "device", "graph_safe")),
    Requirement(_RANDOM, "_CUDA_RNG_STATE_TRACKER", _CPU),
    Requirement(_RANDOM, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", _CPU),
    Requirement(_RANDOM, "_MODEL_PARALLEL_RNG_TRACKER_NAME", "megatron_cpu::CpuRNGStatesTracker"),
    Requirement(_RANDOM, "CudaRNGStatesTracker.add", "megatron_cpu::CpuRNGStatesTracker", ("name", "seed")),
    Requirement(_RANDOM, "CudaRNGStatesTracker.fork", "megatron_cpu::CpuRNGStatesTracker", ("name",)),
    Requirement(_RANDOM, "CudaRNGStatesTracker().states_", "megatron_cpu::CpuRNGStatesTracker"),
    Requirement(_RANDOM, "CudaRNGStatesTracker().seeds_", "megatron_cpu::CpuRNGStatesTracker"),
    Requirement(_RANDOM, "CudaRNGStatesTracker()._is_initialized", "megatron_cpu::CpuRNGStatesTracker"),
    *(Requirement(module, "torch", "megatron_cpu::CudaToCpuTorch") for module in (
        "megatron.core.pipeline_parallel.schedules", _OPTIMIZER, "megatron.core.optimizer.clip_grads",
        "megatron.core.distributed.param_and_grad_buffer", "megatron.core.distributed.finalize_model_grads",
        "megatron.core.utils")),
    Requirement(_OPTIMIZER, "clip_grad_by_total_norm_fp32", "megatron_cpu::clip_grad_by_total_norm_on_cpu",
                ("parameters", "max_norm", "total_norm", "use_decoupled_grad")),
    Requirement("megatron.core.models.common.language_module.language_module",
                "LanguageModule.setup_embeddings_and_output_layer", "megatron_cpu::tied_embedding_setup_on_cpu"),
    # megatron_optimizer: the training step's parts of mcore's optimizer step
    Requirement(_OPTIMIZER, "MegatronOptimizer.prepare_grads", "megatron_optimizer::prepare_grads"),
    Requirement(_OPTIMIZER, "ChainedOptimizer.prepare_grads", "megatron_optimizer::prepare_grads"),
    Requirement(_OPTIMIZER, "MegatronOptimizer.step_with_ready_grads", "megatron_optimizer::step_with_ready_grads"),
    Requirement(_OPTIMIZER, "ChainedOptimizer.step_with_ready_grads", "megatron_optimizer::step_with_ready_grads"),
    Requirement(_OPTIMIZER, "MegatronOptimizer.get_parameters", "megatron_optimizer::clip_grads_by_total_norm"),
    Requirement("megatron.core.optimizer.optimizer_config",
                "OptimizerConfig().use_precision_aware_optimizer_no_fp8_or_ds_fp8",
                "megatron_optimizer::clip_grads_by_total_norm"),
    Requirement(_OPTIMIZER, "Float16OptimizerWithFloat16Params._copy_main_params_to_model_params",
                "megatron_optimizer::skip_copy_of_masters_to_model"),
    # megatron_checkpointing
    Requirement("megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue",
                "megatron_checkpointing::use_in_process_checkpoint_results_queue"),
    Requirement("megatron.core.dist_checkpointing.strategies.filesystem_async", "_get_write_results_queue",
                "megatron_checkpointing::use_in_process_checkpoint_results_queue"),
    # megatron_model
    Requirement("megatron.core.models.gpt.gpt_model", "GPTModel._preprocess", "megatron_model::GPTModelHooks",
                ("packed_seq_params",)),
    Requirement("megatron.core.models.gpt.gpt_model", "GPTModel._postprocess", "megatron_model::GPTModelHooks",
                ("hidden_states", "input_ids", "position_ids", "labels", "loss_mask")),
    Requirement("megatron.core.tensor_parallel.layers", "_grad_accum_fusion_available",
                "megatron_model::fuse_weight_grad_accumulation"),
    Requirement("megatron.core.tensor_parallel.layers", "linear_with_grad_accumulation_and_async_allreduce",
                "megatron_model::fuse_weight_grad_accumulation", ("gradient_accumulation_fusion",)),
    # torch_private
    Requirement("torch.utils._foreach_utils", "_get_fused_kernels_supported_devices",
                "torch_private::fused_optimizer_device_types"),
    Requirement("torch.optim.adam", "adam", "torch_private::adam_gradient_scaling", ("grad_scale", "found_inf")),
    Requirement("torch.cuda", "synchronize", "torch_private::count_cuda_synchronize_callers"),
)


def _resolve(requirement: Requirement) -> Optional[str]:
    """None when ``requirement`` holds, else what is missing."""
    try:
        target = importlib.import_module(requirement.module)
    except ImportError:
        return f"module {requirement.module}"
    for part in requirement.symbol.split("."):
        if part.endswith("()"):
            cls = getattr(target, part[:-2], None)
            if cls is None:
                return requirement.name
            target = cls()
            continue
        if not hasattr(target, part):
            return requirement.name
        target = getattr(target, part)
    missing = [name for name in requirement.parameters if name not in _parameters(target)]
    if missing:
        return f"{requirement.name}: parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    return None


def _parameters(function) -> Sequence[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _installed_versions() -> str:
    versions = []
    for package in ("megatron-core", "torch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not found)")
    return ", ".join(versions)


def missing_symbols(requirements: Iterable[Requirement] = REQUIREMENTS) -> List[str]:
    """One line per requirement that does not hold: the missing symbol and the adaptation that needs it."""
    lines = []
    for requirement in requirements:
        missing = _resolve(requirement)
        if missing is not None:
            lines.append(f"{missing} (needed by nemo_customizer.compat.{requirement.patch})")
    return lines


_checked = False


def check_compat(requirements: Optional[Iterable[Requirement]] = None) -> None:
    """Raise ``MegatronCompatError`` naming every symbol of ``requirements`` (default: all of them, checked once
    per process) that the installed megatron-core / torch lacks."""
    global _checked
    if requirements is None and _checked:
        return
    lines = missing_symbols(REQUIREMENTS if requirements is None else requirements)
    if lines:
        raise MegatronCompatError(
            f"nemo_customizer supports {SUPPORTED_VERSIONS}; installed: {_installed_versions()}. "
            "The installed version lacks what these adaptations of it need:\n  " + "\n  ".join(lines))
    if requirements is None:
        _checked = True
