"""Export a job's resumable checkpoint as HF files, at any parallel layout.

A job trained at TP=2 (or PP=2) writes ``checkpoints/step_…`` with global tensor shapes. ``export_checkpoint``
builds the model at the layout it is run with (one process: TP=1), loads the checkpoint's trainable weights into
it and writes what the job's finetuning type exports: ``adapter/`` (HF PEFT) and/or ``model/`` (HF checkpoint).
Useful for a job that was stopped before it finished, or to export the latest weights instead of the best ones.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence

from nemo_customizer.config import config_from_file, validate_config
from nemo_customizer.config.validate import check_parallel_layout
from nemo_customizer.jobs import CONFIG_FILE, LATEST_CHECKPOINT_FILE, JobDirectory


def export_checkpoint(job_dir: str, output_dir: Optional[str] = None, *, checkpoint: Optional[str] = None,
                      overrides: Sequence[str] = ()) -> Path:
    """Write the HF export of ``checkpoint`` (default: the job's latest) into ``output_dir``.

    ``output_dir`` defaults to ``<job_dir>/export-<checkpoint name>``. ``overrides`` change the saved config
    (``model.tensor_parallel_size=1``; launch with torchrun for a layout of several processes). Returns the
    output directory.
    """
    job = JobDirectory(Path(job_dir).expanduser().resolve())
    if not (job.path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{job_dir} is not a job directory ({CONFIG_FILE} is missing).")
    source = Path(checkpoint) if checkpoint else job.latest_checkpoint()
    if source is None or not source.is_dir():
        raise FileNotFoundError(f"{job_dir} has no checkpoint to export "
                                f"({checkpoint or job.checkpoints_path / LATEST_CHECKPOINT_FILE} not found).")
    cfg = config_from_file(job.path / CONFIG_FILE, overrides)
    validate_config(cfg, training=False)
    check_parallel_layout(cfg.model, cfg.hyperparameters, int(os.environ.get("WORLD_SIZE", "1")))
    out = Path(output_dir).expanduser().resolve() if output_dir else job.path / f"export-{source.name}"
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another output directory.")
    _export(cfg, source, JobDirectory(out))
    return out


def _export(cfg, source: Path, out: JobDirectory) -> None:
    """The job's model (LoRA attached as in training) with the checkpoint's trained weights, written as HF files."""
    import torch

    from nemo_customizer.checkpoints.resolve import load_tokenizer, resolve_model
    from nemo_customizer.training.checkpointing import Checkpointer
    from nemo_customizer.training.finetuning import best_checkpoint_saver
    from nemo_customizer.training.session import TrainingSession

    if cfg.precision == "fp8":
        # An export trains nothing: the base is re-read in bf16 from the HF checkpoint (a merged model must not be
        # folded into the FP8-rounded weights the job trained on), the checkpoint's adapters loaded into it.
        cfg = dataclasses.replace(cfg, precision="auto")
    resolved = resolve_model(cfg.model, cfg.cache_dir)
    tokenizer = load_tokenizer(resolved.tokenizer_dir, cfg.model.chat_template)
    with TrainingSession(cfg, checkpoint_dir=resolved.checkpoint_dir) as session:
        model = session.build_model()  # no optimizer: only the weights are read back
        Checkpointer(source.parent, model, None, None, session.layout).load(source, weights_only=True)
        if session.layout.is_main:
            out.path.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        best_checkpoint_saver(model, cfg, out, source_dir=resolved.checkpoint_dir, tokenizer=tokenizer)()
