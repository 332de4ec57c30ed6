"""Resumable training checkpoints with ``megatron.core.dist_checkpointing``.

A checkpoint holds what training changes: the trainable weights (only the adapters for LoRA; the frozen base is
re-read from the HF checkpoint), the optimizer state, the learning-rate schedule, every rank's RNG states and the
loop's ``LoopState`` (steps, early stopping, totals), saved whole. Tensors are saved with their global shapes and
tensor/pipeline-parallel offsets, so a job saved at TP=2 loads at TP=1 (or PP=2, or another DP size).

On disk (``<job_dir>/checkpoints/``)::

    step_00000040/     one dist_checkpointing directory per saved step
    latest             the name of the last complete checkpoint, replaced atomically

A checkpoint is written to ``.tmp-step_…`` and renamed when every rank has finished, then ``latest`` is replaced:
an interrupted save leaves the previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from nemo_customizer.compat import use_in_process_checkpoint_results_queue
from nemo_customizer.config import ConfigError
from nemo_customizer.distributed.parallel import ParallelLayout, rng_tracker_states, set_rng_tracker_states
from nemo_customizer.jobs import LATEST_CHECKPOINT_FILE, write_file_atomic
from nemo_customizer.training.optim import torch_adams
from nemo_customizer.training.state import LoopState

# The distributed optimizer's state as each rank holds it. mcore's "fully_reshardable" format would also reload at
# another TP/PP layout, but with torch's Adam (no TE/apex) 0.16.1 cannot load it: its per-parameter copy expects a
# "step" tensor that format leaves out (KeyError). "dp_reshardable" keeps everything, "step" included.
_DISTRIBUTED_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
_LOOP_STATE = "position"
"""The common-state key of ``LoopState.to_checkpoint()``."""


class Checkpointer:
    """Saves and loads resumable checkpoints of one job (collective: every rank calls ``save``/``load``)."""

    def __init__(self, root: Path, model: torch.nn.Module, optimizer, scheduler, layout: ParallelLayout, *,
                 distributed_optimizer: bool = False, keep_last: int = 1):
        self.root = root
        """The job's ``checkpoints/`` directory."""
        self.model = model
        """The bare model (not the DDP / Float16Module wrappers): its parameters are the optimizer's."""
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.layout = layout
        self.trainable_only = not all(p.requires_grad for p in model.parameters())
        """A frozen base (LoRA) is re-read from the HF checkpoint: only the trained tensors are saved."""
        self.distributed_optimizer = distributed_optimizer
        self.keep_last = max(keep_last, 1)

    # --- what is saved -------------------------------------------------------------------------------------------

    def _model_state(self) -> dict:
        state = self.model.sharded_state_dict()
        if self.trainable_only:
            # A factory too: a fused gate/up adapter (Phi-3's gate_up_proj) saves its B as gate and up halves
            state = {k: v for k, v in state.items()
                     if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and v.data.requires_grad}
        return state

    def _sharded_state(self, *, is_loading: bool) -> dict:
        model_state = self._model_state()
        optimizer_kwargs = {"metadata": _DISTRIBUTED_OPTIMIZER_FORMAT} if self.distributed_optimizer else {}
        layout = self.layout
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, **optimizer_kwargs),
            # One object per rank; only a run with the same world size restores them (see ``load``).
            "rng": ShardedObject("rng", _rng_state(), (layout.world_size,), (layout.rank,), replica_id=0),
        }

    def _model_parallel(self) -> dict:
        return {"tensor_parallel_size": self.layout.tensor_parallel_size,
                "pipeline_parallel_size": self.layout.pipeline_parallel_size}

    # --- save ------------------------------------------------------------------------------------------------------

    def save(self, loop: LoopState) -> Path:
        """Write a checkpoint of the current weights, optimizer, schedule, RNG and the loop's state."""
        name = f"step_{loop.steps:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.layout.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir()
        dist.barrier()
        state = self._sharded_state(is_loading=False)
        state["scheduler"] = self.scheduler.state_dict()
        state[_LOOP_STATE] = loop.to_checkpoint()
        state["world_size"] = self.layout.world_size
        state["model_parallel"] = self._model_parallel()
        use_in_process_checkpoint_results_queue()  # no spawned Manager: scripts need no __main__ guard
        dist_checkpointing.save(state, str(tmp))
        dist.barrier()  # every rank's shards are on disk
        if self.layout.is_main:
            if final.exists():  # the same step saved again (a resumed job reached it anew)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_file_atomic(self.root / LATEST_CHECKPOINT_FILE, name + "\n")
            self._prune(keep=final)
        dist.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # --- load ------------------------------------------------------------------------------------------------------

    def load(self, path: Path, *, weights_only: bool = False) -> Optional[LoopState]:
        """Restore the trainable weights (and unless ``weights_only``, optimizer, schedule and RNG) from ``path``;
        returns the loop's state (None with ``weights_only``).

        RNG states are restored only when the world size is the one that saved them; another layout resumes
        with the same weights and data order but fresh dropout masks.
        """
        common = dist_checkpointing.load_common_state_dict(str(path))
        if weights_only:
            state = {"model": self._model_state()}
        else:
            if self.distributed_optimizer:
                saved, now = common.get("model_parallel", self._model_parallel()), self._model_parallel()
                if saved != now:
                    raise ConfigError(
                        f"{path} was saved with the distributed optimizer at {_describe(saved)}; its optimizer state "
                        f"resumes only at that layout (any data-parallel size), not at {_describe(now)}. Resume with "
                        "those sizes, or export its weights at any layout: python -m nemo_customizer export JOB_DIR")
                _allocate_adam_state(self.optimizer)
            state = self._sharded_state(is_loading=True)
            if common.get("world_size") != self.layout.world_size:
                state.pop("rng")
        loaded = dist_checkpointing.load(state, str(path))
        _, unexpected = self.model.load_state_dict(loaded["model"], strict=False)
        if unexpected:
            raise RuntimeError(f"{path}: checkpoint tensors {unexpected[:3]} do not exist in this model")
        if not weights_only:
            with torch.no_grad():  # the distributed optimizer copies into its fp32 main params in place
                self.optimizer.load_state_dict(loaded["optimizer"])
            if self.distributed_optimizer:
                _restore_adam_steps(self.optimizer, loaded["optimizer"])
            self.scheduler.load_state_dict(common["scheduler"])
            if "rng" in loaded:
                _set_rng_state(loaded["rng"])
        return None if weights_only else LoopState.from_checkpoint(common[_LOOP_STATE])


def _describe(model_parallel: dict) -> str:
    return ", ".join(f"model.{key}={value}" for key, value in model_parallel.items())


# Two gaps in megatron-core 0.16's DistributedOptimizer when its inner optimizer is torch's Adam (no Transformer
# Engine or apex, our torch-native GPU path), which a resumed multi-GPU job meets (the tests reproduce them on CPU):
# - ``sharded_state_dict(is_loading=True)`` starts from ``state_dict()``, which asserts that every parameter's Adam
#   state has one common ``step``; before the first step there is no state, so loading fails.
# - The per-parameter ``step`` comes back as the placeholder's value, and ``load_state_dict`` gives every parameter
#   one shared step tensor, which torch's Adam then advances once per parameter per step. The checkpoint's step is
#   in the optimizer's param groups.
# The moments and master weights load correctly.

def _allocate_adam_state(optimizer) -> None:
    """Zero Adam state (step 0) for every parameter without any: placeholders the checkpoint's values replace."""
    for _, inner in torch_adams(optimizer):
        for group in inner.param_groups:
            # torch keeps the step on the parameter's device for its fused and capturable kernels, on the host else
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                if not inner.state[param]:
                    step = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
                    inner.state[param] = {"step": step, "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Give each parameter its own ``step`` tensor holding the checkpoint's step count (from its param groups)."""
    single = len(getattr(optimizer, "chained_optimizers", [optimizer])) == 1
    for index, inner in torch_adams(optimizer):
        state = loaded if single else loaded[index]  # one chained optimizer saves its state unprefixed
        steps = {group["step"] for group in state["optimizer"]["param_groups"]}
        if len(steps) != 1:
            raise RuntimeError(f"checkpoint optimizer param groups disagree on the Adam step: {sorted(steps)}")
        step = float(steps.pop())
        for param_state in inner.state.values():
            param_state["step"] = torch.tensor(step, dtype=torch.float32, device=param_state["step"].device)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": rng_tracker_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    set_rng_tracker_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
