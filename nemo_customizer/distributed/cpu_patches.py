"""Work-arounds that let megatron-core 0.16.1 run on a CPU-only torch.

Megatron-core assumes CUDA in a handful of places. Each patch below names the mcore code it works around. They are
applied once, only when the job's device is CPU (``apply_cpu_patches``), and never on GPU machines. They are
process-wide and one-way: a process that ran a CPU job uses the CPU from then on.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False

# mcore modules that create tensors with a literal device="cuda" (the line numbers are megatron-core 0.16.1's):
# pipeline_parallel/schedules.py:596 (token counter), optimizer/optimizer.py:473-485,907 (loss-scale and found-inf
# buffers), optimizer/clip_grads.py:90-115,174 (grad-norm buffers), distributed/param_and_grad_buffer.py:768,
# utils.py:1207 (local_multi_tensor_l2_norm, the grad-norm fallback used without apex/TE).
_MODULES_WITH_CUDA_TENSORS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
)
_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


class _CpuDeviceTorch:
    """Stands in for the ``torch`` module inside the modules above: tensor factories asked for a CUDA device
    get the CPU instead; everything else is the real torch."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _TENSOR_FACTORIES:
            def factory(*args, _create=attr, **kwargs):
                device = kwargs.get("device")
                if device is not None and str(device).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return _create(*args, **kwargs)

            return factory
        return attr


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mpu_random

    class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """Model-parallel RNG tracker over the CPU generator.

        mcore's tracker (tensor_parallel/random.py, ``CudaRNGStatesTracker.add``) seeds and snapshots
        ``torch.cuda`` RNG state; here the named states are CPU generator states instead.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"rng seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # mcore's fork warns when the CPU state changes inside the context, which is exactly what a CPU
            # tracker does; swap states without that check.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return CpuRNGStatesTracker


def apply_cpu_patches() -> None:
    """Patch mcore's CUDA-only paths so models, DDP and the optimizer run on CPU tensors."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.tensor_parallel import random as mpu_random

    # tensor_parallel/random.py: _get_cuda_rng_state / _set_cuda_rng_state read torch.cuda generators.
    mpu_random._get_cuda_rng_state = _cpu_get_rng_state
    mpu_random._set_cuda_rng_state = _cpu_set_rng_state
    # tensor_parallel/random.py: initialize_rng_tracker builds a CudaRNGStatesTracker; install ours instead
    # and mark it initialized so model_parallel_cuda_manual_seed keeps it.
    mpu_random._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker_class()()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # RoPE (models/common/embeddings/rotary_pos_embedding.py), DDP buffers
    # (distributed/param_and_grad_buffer.py: device=torch.cuda.current_device()) and the pipeline's receive buffers
    # (pipeline_parallel/p2p_communication.py:313,321) ask for the current CUDA device.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # optimizer/clip_grads.py and DDP call torch.cuda.synchronize / streams for timing and overlap, and the
    # pipeline's batched isend/irecv syncs after each exchange (pipeline_parallel/p2p_communication.py:398).
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]

    import importlib

    proxy = _CpuDeviceTorch()
    for name in _MODULES_WITH_CUDA_TENSORS:
        importlib.import_module(name).torch = proxy

    # optimizer/clip_grads.py:167 asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``; same clipping without it.
    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    _patch_tied_embedding_setup()
    _APPLIED = True


def _patch_tied_embedding_setup() -> None:
    """models/common/language_module/language_module.py:244 (``setup_embeddings_and_output_layer``) moves the
    tied word embedding to CUDA (``weight.data = weight.data.cuda()``) before all-reducing it from the first to the
    last pipeline stage. Run it with ``Tensor.cuda`` as the identity, so the weight stays on the CPU."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_on_cpu(self, *args, **kwargs):
        to_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor  # type: ignore[method-assign]
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = to_cuda  # type: ignore[method-assign]

    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    grads = [p.decoupled_grad if use_decoupled_grad else p.grad for p in parameters]
    grads = [g.detach() for g in grads if g is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)
