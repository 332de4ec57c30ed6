"""Scoped adaptations that let megatron-core 0.16.x run a job on a CPU-only torch.

megatron-core assumes CUDA in a handful of places: tensors created with a literal ``device="cuda"``, calls of
``torch.cuda.current_device()`` / ``torch.cuda.synchronize()``, CUDA RNG states in its model-parallel RNG tracker, a
type assertion in gradient clipping and a ``.cuda()`` in the tied-embedding setup. ``enter_cpu_adaptations`` replaces
each of them for a CPU job; the returned ``CpuAdaptations`` puts every original back when the last live CPU job
exits, so the same process can run a CUDA job afterwards. Entering again while adaptations are live (a CPU job
started inside another, as a test module's parallel state and a ``customize()`` call in it are) only counts.

``distributed.parallel.initialize_parallel`` enters them for a CPU device and ``destroy_parallel`` exits them; while
they are live, CUDA is unusable in this process.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, List, Optional

import torch
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.tensor_parallel import random as mcore_random

from nemo_customizer.compat._patching import AttributePatches

MODULES_WITH_CUDA_TENSORS = (
    "megatron.core.pipeline_parallel.schedules",  # the forward/backward schedule's token counter
    "megatron.core.optimizer.optimizer",  # loss-scale and found-inf buffers
    "megatron.core.optimizer.clip_grads",  # gradient-norm buffers
    "megatron.core.distributed.param_and_grad_buffer",  # DDP's bucket buffers
    "megatron.core.distributed.finalize_model_grads",  # the loss-token count's all-reduce
    "megatron.core.utils",  # local_multi_tensor_l2_norm, the gradient-norm fallback without apex/TE
)
"""megatron-core modules that create tensors with a literal ``device="cuda"``; their ``torch`` becomes
``CudaToCpuTorch`` while CPU adaptations are live."""

_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


class CudaToCpuTorch:
    """Stands in for the ``torch`` module inside ``MODULES_WITH_CUDA_TENSORS``: tensor factories asked for a CUDA
    device get the CPU instead; everything else is the real torch.

    Targets megatron-core 0.16.x, whose modules above call ``torch.zeros(..., device="cuda")`` and the like. Without
    it a CPU job fails at its first optimizer step or gradient reduction ("Torch not compiled with CUDA enabled").
    """

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


def cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces megatron-core 0.16.x's ``tensor_parallel.random._get_cuda_rng_state`` (same parameters): the CPU
    generator's state. Without it activation recomputation and the RNG tracker read ``torch.cuda`` generators."""
    state = torch.get_rng_state()
    return state.clone() if clone else state


def cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Replaces megatron-core 0.16.x's ``tensor_parallel.random._set_cuda_rng_state``: sets the CPU generator."""
    torch.set_rng_state(new_state)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core 0.16.x's model-parallel RNG tracker over the CPU generator.

    mcore's tracker (``tensor_parallel/random.py``, ``CudaRNGStatesTracker.add``/``fork``) seeds and snapshots
    ``torch.cuda`` RNG state, which a CPU-only torch lacks; here the named states are CPU generator states. It uses
    the base class's ``states_``, ``seeds_`` and ``_is_initialized``.
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
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
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


def cpu_current_device() -> str:
    """Replaces ``torch.cuda.current_device``: ``"cpu"``. megatron-core 0.16.x places RoPE tables
    (``models/common/embeddings/rotary_pos_embedding.py``), DDP's buffers (``distributed/param_and_grad_buffer.py``)
    and the pipeline's receive buffers (``pipeline_parallel/p2p_communication.py``) on the current CUDA device; on a
    CPU-only torch that call raises."""
    return "cpu"


def skip_cuda_synchronize(*args, **kwargs) -> None:
    """Replaces ``torch.cuda.synchronize``: nothing to wait for on a CPU. megatron-core 0.16.x synchronizes in
    gradient clipping and DDP (timing, overlap) and after each batched isend/irecv of the pipeline
    (``pipeline_parallel/p2p_communication.py``); on a CPU-only torch that call raises."""


def clip_grad_by_total_norm_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """megatron-core 0.16.x's ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (same parameters and scaling)
    without its assertion ``param.grad.type() == 'torch.cuda.FloatTensor'``, which fails for every CPU gradient."""
    grads = [p.decoupled_grad if use_decoupled_grad else p.grad for p in parameters]
    grads = [g.detach() for g in grads if g is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def tied_embedding_setup_on_cpu(setup):
    """``LanguageModule.setup_embeddings_and_output_layer`` (``setup``) run with ``Tensor.cuda`` as the identity.

    megatron-core 0.16.x's version moves the tied word embedding to CUDA (``weight.data = weight.data.cuda()``)
    before all-reducing it from the first to the last pipeline stage; without this a CPU job with pipeline
    parallelism and tied embeddings fails to build its model. The weight stays on the CPU instead.
    """

    def setup_on_cpu(self, *args, **kwargs):
        patches = AttributePatches()
        patches.replace(torch.Tensor, "cuda", lambda tensor, *a, **k: tensor)
        try:
            return setup(self, *args, **kwargs)
        finally:
            patches.undo()

    setup_on_cpu.__wrapped__ = setup
    return setup_on_cpu


def _apply() -> AttributePatches:
    """Every CPU adaptation, recorded so that ``undo`` restores the originals."""
    patches = AttributePatches()
    # tensor_parallel/random.py: activation recomputation and the tracker read and set CUDA generator states.
    patches.replace(mcore_random, "_get_cuda_rng_state", cpu_get_rng_state)
    patches.replace(mcore_random, "_set_cuda_rng_state", cpu_set_rng_state)
    # initialize_rng_tracker would build a CudaRNGStatesTracker; install ours, marked initialized, so that
    # model_parallel_cuda_manual_seed seeds it instead of replacing it.
    patches.replace(mcore_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    patches.replace(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    patches.replace(torch.cuda, "current_device", cpu_current_device)
    patches.replace(torch.cuda, "synchronize", skip_cuda_synchronize)
    proxy = CudaToCpuTorch()
    for name in MODULES_WITH_CUDA_TENSORS:
        patches.replace(importlib.import_module(name), "torch", proxy)
    patches.replace(mcore_optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_on_cpu)
    patches.replace(LanguageModule, "setup_embeddings_and_output_layer",
                    tied_embedding_setup_on_cpu(LanguageModule.setup_embeddings_and_output_layer))
    return patches


_live: List["CpuAdaptations"] = []
_patches: Optional[AttributePatches] = None


class CpuAdaptations:
    """One CPU job's hold on the adaptations (``enter_cpu_adaptations``); ``exit`` releases it, once."""

    def __init__(self) -> None:
        self.live = True

    def exit(self) -> None:
        """Release this hold; the last one to go restores every original. Calling it again does nothing."""
        global _patches
        if not self.live:
            return
        self.live = False
        _live.remove(self)
        if not _live and _patches is not None:
            _patches.undo()
            _patches = None


def enter_cpu_adaptations() -> CpuAdaptations:
    """Apply the CPU adaptations (if no CPU job holds them yet) and return this job's hold on them."""
    global _patches
    if _patches is None:
        _patches = _apply()
    hold = CpuAdaptations()
    _live.append(hold)
    return hold


def exit_all_cpu_adaptations() -> None:
    """Release every hold and restore the originals (a teardown of all parallel state)."""
    for hold in list(_live):
        hold.exit()


def cpu_adaptations_active() -> bool:
    """Whether a CPU job holds the adaptations now."""
    return bool(_live)


@contextlib.contextmanager
def cpu_adaptations() -> Iterator[CpuAdaptations]:
    """``enter_cpu_adaptations`` for the ``with`` block."""
    hold = enter_cpu_adaptations()
    try:
        yield hold
    finally:
        hold.exit()
