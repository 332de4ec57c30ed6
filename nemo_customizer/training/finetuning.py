"""What a finetuning type trains and what it exports: LoRA adapter, merged model, or all weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from nemo_customizer.config.schema import Config
from nemo_customizer.jobs import JobDirectory


@dataclass(frozen=True)
class TrainableSummary:
    """What trains, for the job log and the result."""

    description: str
    trainable_parameters: int
    total_parameters: int

    def __str__(self) -> str:
        return self.description


def prepare_trainable(model: torch.nn.Module, cfg: Config) -> TrainableSummary:
    """Attach LoRA (``lora``, ``lora_merged``) or leave every weight trainable (``all_weights``).

    Counts are the whole model's, whatever the tensor/pipeline layout (collective: every rank calls it).
    """
    hp = cfg.hyperparameters
    if hp.finetuning_type == "all_weights":
        _, total = model_parameter_counts(model)
        return TrainableSummary(f"full fine-tuning: all {total:,} parameters train", total, total)
    from nemo_customizer.peft.apply import apply_lora

    lora = apply_lora(model, cfg.model.architecture, hp.lora, hp.seed)
    trainable, total = model_parameter_counts(model)
    lora = dataclasses.replace(lora, trainable_parameters=trainable, total_parameters=total)
    return TrainableSummary(str(lora), trainable, total)


def model_parameter_counts(model: torch.nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameters of the whole model: tensor-parallel shards summed over the ranks, tensors
    every tensor-parallel rank holds a copy of (norms, a column-parallel LoRA's A) counted once, and the pipeline's
    copy of a tied embedding left out (collective over the model-parallel group)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from nemo_customizer.distributed.collectives import all_reduce_sum

    counted = [p for p in model.parameters() if param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p)]
    local = [float(sum(p.numel() for p in counted if p.requires_grad)), float(sum(p.numel() for p in counted))]
    group = parallel_state.get_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    trainable, total = all_reduce_sum(local, group=group)
    return int(trainable), int(total)


def best_checkpoint_saver(model: torch.nn.Module, cfg: Config, job: JobDirectory, *, source_dir: Optional[Path],
                          tokenizer) -> Callable[[], None]:
    """The collective "save the best weights" callback for this finetuning type.

    ``lora`` writes ``adapter/`` (HF PEFT); ``lora_merged`` writes ``adapter/`` and ``model/`` (adapter folded into
    the base, a plain HF checkpoint); ``all_weights`` writes ``model/``. For an image-text checkpoint (Gemma 3 4B
    and larger) ``model/`` is the image-text model again, its vision tower copied unchanged, and ``adapter/`` names
    its language model's modules (``checkpoints.hf_export``, ``peft.export``).
    """
    from nemo_customizer.checkpoints.hf_export import is_export_rank, save_hf_checkpoint
    from nemo_customizer.models.hf_state import hf_state_dict
    from nemo_customizer.peft.export import adapter_state_dict, save_peft_adapter
    from nemo_customizer.peft.merge import merge_lora_into_hf

    hp = cfg.hyperparameters
    arch = cfg.model.architecture
    base_name = str(source_dir or cfg.model.name)

    def save() -> None:
        if hp.finetuning_type in ("lora", "lora_merged"):
            save_peft_adapter(model, hp.lora, job.adapter_path, base_name, architecture=arch)
        if hp.finetuning_type in ("lora_merged", "all_weights"):
            state = hf_state_dict(model, arch)
            if hp.finetuning_type == "lora_merged":
                state = merge_lora_into_hf(state, adapter_state_dict(model), hp.lora.alpha / hp.lora.adapter_dim)
            if is_export_rank():
                save_hf_checkpoint(state, arch, job.model_path, source_dir=source_dir, tokenizer=tokenizer)

    return save

