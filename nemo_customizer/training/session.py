"""``TrainingSession``: the one place a job's model, wrapper, optimizer, schedule and CUDA graphs are built.

Training (``customize``), export, generation, the benchmarks and the tests all build through it, in one order:

    parallel state → model (+ the checkpoint's weights) → LoRA / trainable → CUDA graphs → DDP wrap → optimizer →
    scheduler

and leave it through one teardown: captured graphs released, then the parallel state, if the session started it.

    with TrainingSession(cfg, checkpoint_dir=resolved.checkpoint_dir) as session:   # starts the parallel state
        session.build_model()                  # session.model (LoRA attached), session.trainable
        session.build_training(total_steps, packed=True, pad_id=pad_id)
        ...                                    # session.wrapped, .optimizer, .scheduler, .graphs

The parts are built by explicit calls because a caller needs the parallel layout before it can say how many steps
the schedule has (the packing plan depends on the data-parallel size). Inference and export build only a model,
no optimizer: ``build_model()`` is the training job's model (a resumable checkpoint loads into it: export);
``build_model(trainable=False)`` is the base model alone (generation attaches adapters itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from nemo_customizer.config.schema import Config
from nemo_customizer.distributed.parallel import (ParallelLayout, destroy_parallel, initialize_parallel, params_dtype,
                                                   resolve_device)
from nemo_customizer.models.gpt import build_model_for_job
from nemo_customizer.training.finetuning import TrainableSummary, prepare_trainable

if TYPE_CHECKING:
    from nemo_customizer.training.graphs import GraphedForwardBackward


class TrainingSession:
    """A job's training objects for this rank, built from a resolved ``Config`` and torn down together.

    ``cfg``: a resolved config (``cfg.model.architecture`` is the checkpoint's); its model section gives the
    parallel layout and the model, ``hyperparameters`` the LoRA / finetuning type, recomputation, DDP, optimizer and
    CUDA-graph settings, ``device`` and ``precision`` the device and weights dtype.
    ``checkpoint_dir``: the HF checkpoint whose weights are loaded (``ResolvedModel.checkpoint_dir``); None keeps
    random weights (``model.random_weights``).
    ``layout``: a parallel state the caller started (and will destroy); without one the session starts its own
    (seeded with ``hyperparameters.seed``; ``single_process``: a world of this process alone even under a launcher)
    and destroys it on ``close()``.

    Use it as a context manager (or call ``close()``): on exit the captured graphs are released and the session
    lets go of the model, wrapper, optimizer and scheduler; ``layout`` and ``trainable`` stay readable.
    """

    def __init__(self, cfg: Config, *, checkpoint_dir: Optional[Union[str, Path]],
                 layout: Optional[ParallelLayout] = None, single_process: bool = False):
        self.cfg = cfg
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.owns_layout = layout is None
        if layout is None:
            layout = initialize_parallel(tensor_parallel_size=cfg.model.tensor_parallel_size,
                                         pipeline_parallel_size=cfg.model.pipeline_parallel_size,
                                         device=resolve_device(cfg.device), seed=cfg.hyperparameters.seed,
                                         single_process=single_process)
        self.layout: ParallelLayout = layout
        self.device: torch.device = layout.device
        self.params_dtype: torch.dtype = params_dtype(cfg.precision, self.device)
        self.model: Optional[torch.nn.Module] = None
        """This rank's GPTModel (LoRA attached when built for training): what checkpoints save and exports read."""
        self.transformer_config = None
        """mcore's ``TransformerConfig`` of ``model``."""
        self.trainable: Optional[TrainableSummary] = None
        """What trains (``build_model()``); None for a model built with ``trainable=False``."""
        self.graphs: Optional["GraphedForwardBackward"] = None
        """The CUDA-graph runner of packed micro batches (``hyperparameters.cuda_graphs``), else None."""
        self.wrapped: Optional[torch.nn.Module] = None
        """``model`` wrapped for training (mixed precision + mcore DDP): what the training step runs."""
        self.optimizer = None
        self.scheduler = None
        self._closed = False

    def build_model(self, *, trainable: bool = True) -> torch.nn.Module:
        """Build this rank's model, load the checkpoint's weights (unless random) and return it as ``self.model``.

        ``trainable=True``: the model the training job trains: the config's activation checkpointing /
        ``recompute_modules``, then LoRA attached (``lora``, ``lora_merged``) or every weight trainable
        (``all_weights``), summarized in ``self.trainable`` (collective: every rank calls it); with ``precision=fp8``
        the frozen linears are then held in FP8 (``models.fp8_linear``; simulated off CUDA).
        ``trainable=False``: the base model as inference runs it (no adapters, nothing recomputed).
        """
        if self.model is not None:
            raise RuntimeError("this TrainingSession's model is already built")
        hp = self.cfg.hyperparameters
        self.model, self.transformer_config = build_model_for_job(
            self.cfg.model, self.checkpoint_dir, device=self.device, params_dtype=self.params_dtype,
            activation_checkpointing=hp.activation_checkpointing if trainable else False,
            recompute_modules=tuple(hp.recompute_modules) if trainable else ())
        if trainable:
            self.trainable = prepare_trainable(self.model, self.cfg)
            if self.cfg.precision == "fp8":  # the frozen base, once LoRA has wrapped it (counted above in bf16)
                from nemo_customizer.models.fp8_linear import convert_frozen_linears_to_fp8

                convert_frozen_linears_to_fp8(self.model)
            # A preference loss weighs each token's loss by how its pair compares (training.preference).
            self.model.per_position_loss_grads = hp.training_type == "dpo"
        return self.model

    def build_training(self, total_steps: int, *, packed: bool = False, pad_id: int = 0) -> torch.nn.Module:
        """The CUDA-graph runner (``hyperparameters.cuda_graphs`` and ``packed`` micro batches), the DDP-wrapped
        model (built on the graphs' capture stream), the optimizer and a schedule of ``total_steps`` steps; returns
        ``self.wrapped``. ``pad_id`` fills the graphs' padded positions."""
        # Imported here: a session that only builds a model (generation, export) never loads the training parts.
        from nemo_customizer.training.graphs import GraphedForwardBackward
        from nemo_customizer.training.optim import build_optimizer, build_scheduler
        from nemo_customizer.training.wrap import wrap_for_training

        if self.trainable is None:
            raise RuntimeError("build_training needs the model built for training: call build_model() first")
        if self.wrapped is not None:
            raise RuntimeError("this TrainingSession's training parts are already built")
        hp = self.cfg.hyperparameters
        if hp.cuda_graphs and packed:
            self.graphs = GraphedForwardBackward(self.device, max_seqlen=self.cfg.model.max_seq_length,
                                                 tensor_parallel_size=self.layout.tensor_parallel_size, pad_id=pad_id)
        model, config = self.model, self.transformer_config

        def wrap() -> torch.nn.Module:
            return wrap_for_training(model, config, distributed_optimizer=hp.use_distributed_optimizer,
                                     fp32_grads=hp.fp32_master_weights)

        self.wrapped = self.graphs.wrap(wrap) if self.graphs is not None else wrap()
        self.optimizer = build_optimizer([self.wrapped], hp, self.params_dtype)
        self.scheduler = build_scheduler(self.optimizer, hp, total_steps)
        return self.wrapped

    def close(self) -> None:
        """Release the captured graphs (before the process groups: NCCL's teardown can wait on communicators a live
        graph references), let go of the built parts, and destroy the parallel state if this TrainingSession started it.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.graphs is not None:
                self.graphs.release()
        finally:
            self.graphs = self.wrapped = self.optimizer = self.scheduler = self.model = None
            if self.owns_layout:
                destroy_parallel(self.layout)

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
