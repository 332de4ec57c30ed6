"""What a finetuning type trains and what it exports: LoRA adapter, merged model, or all weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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

    Counts are this rank's (its tensor/pipeline shard).
    """
    hp = cfg.hyperparameters
    if hp.finetuning_type == "all_weights":
        total = sum(p.numel() for p in model.parameters())
        return TrainableSummary(f"full fine-tuning: all {total:,} parameters train", total, total)
    from nemo_customizer.peft.apply import apply_lora

    lora = apply_lora(model, cfg.model.architecture, hp.lora, hp.seed)
    return TrainableSummary(str(lora), lora.trainable_parameters, lora.total_parameters)


def best_checkpoint_saver(model: torch.nn.Module, cfg: Config, job: JobDirectory, *, source_dir: Optional[Path],
                          tokenizer) -> Callable[[], None]:
    """The collective "save the best weights" callback for this finetuning type.

    ``lora`` writes ``adapter/`` (HF PEFT); ``lora_merged`` writes ``adapter/`` and ``model/`` (adapter folded into
    the base, a plain HF checkpoint); ``all_weights`` writes ``model/``.
    """
    from nemo_customizer.checkpoints.hf_export import hf_state_dict, is_export_rank, save_hf_checkpoint
    from nemo_customizer.peft.export import adapter_state_dict, save_peft_adapter
    from nemo_customizer.peft.merge import merge_lora_into_hf

    hp = cfg.hyperparameters
    arch = cfg.model.architecture
    base_name = str(source_dir or cfg.model.name)

    def save() -> None:
        if hp.finetuning_type in ("lora", "lora_merged"):
            save_peft_adapter(model, hp.lora, job.adapter_path, base_name)
        if hp.finetuning_type in ("lora_merged", "all_weights"):
            state = hf_state_dict(model, arch)
            if hp.finetuning_type == "lora_merged":
                state = merge_lora_into_hf(state, adapter_state_dict(model), hp.lora.alpha / hp.lora.adapter_dim)
            if is_export_rank():
                save_hf_checkpoint(state, arch, job.model_path, source_dir=source_dir, tokenizer=tokenizer)

    return save

