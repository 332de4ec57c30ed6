"""The job directory: resolved config, metrics, adapter, result. Checked before any training starts."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf

from nemo_customizer.config import Config, ConfigError, num_parameters

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
LATEST_CHECKPOINT_FILE = "latest"
"""In ``checkpoints/``: the name of the last complete checkpoint."""

# Settings a resumed job may change: where and how it runs, not what it computes.
RESUMABLE_CHANGES = (
    "output_dir", "device", "progress_bar", "log_interval", "cache_dir", "dataset.store_dir", "checkpoint.keep_last",
    "model.tensor_parallel_size", "model.pipeline_parallel_size", "model.use_sequence_parallel",
    "hyperparameters.micro_batch_size", "evaluation", "logger",
)


MIN_FREE_BYTES = 256 * 2**20
"""Free disk space every job needs in output_dir (config, metrics, plots, an adapter), beyond exported models."""


class OutputDirError(ConfigError):
    """``output_dir`` cannot hold the job: too little free disk space, or a path that cannot be resolved.

    (A file in its place or on its path raises ``FileExistsError``, an unwritable one ``PermissionError``.)
    """


def check_output_dir(output_dir: str, cfg: Optional[Config] = None) -> None:
    """Refuse an ``output_dir`` the job could not write to, creating nothing.

    ``api.run`` calls it before any data is read or model built, and ``JobDirectory.create`` again just before it
    makes the directory: a file in its place or on its path, no write permission where the directory is (or would
    be created), or less free disk space than ``required_free_bytes(cfg)``.
    """
    try:
        path = Path(output_dir).expanduser().resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symbolic link loop (Python 3.11)
        raise OutputDirError(f"output_dir={output_dir} cannot be resolved ({err}); choose another path.") from None
    existing = path  # the directory itself, or the nearest ancestor that exists: where mkdir will create it
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"has a file on its path ({existing})"
        raise FileExistsError(f"output_dir={output_dir} {where}; choose a directory path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise PermissionError(f"output_dir={output_dir} {what}; choose a directory you can write to.")
    need, free = required_free_bytes(cfg), shutil.disk_usage(existing).free
    free += _size_of(path / CHECKPOINTS_DIR)  # a resumed job's checkpoints count: new ones replace them
    if free < need:
        hint = (" (most of it for full-weight resumable checkpoints: lower checkpoint.keep_last or set "
                "checkpoint.enabled=false)" if cfg is not None and cfg.hyperparameters.finetuning_type == "all_weights"
                and cfg.checkpoint.enabled else "")
        raise OutputDirError(f"output_dir={output_dir}: its disk has {_gib(free)} free, the job needs at least "
                             f"{_gib(need)}{hint}; free space or choose an output_dir on another disk.")


def required_free_bytes(cfg: Optional[Config]) -> int:
    """``MIN_FREE_BYTES``, plus for ``lora_merged``/``all_weights`` the exported model at 2 bytes per parameter,
    plus for ``all_weights`` with checkpoints on, ``checkpoint.keep_last + 1`` resumable checkpoints (the kept ones
    and the one being written) of ``checkpoint_bytes_per_parameter`` each. LoRA checkpoints hold only adapters."""
    if cfg is None or cfg.hyperparameters.finetuning_type == "lora" or cfg.model.architecture_from_checkpoint:
        return MIN_FREE_BYTES  # (hf-llama's architecture is known only once the checkpoint is resolved)
    parameters = num_parameters(cfg.model.architecture)
    need = MIN_FREE_BYTES + 2 * parameters
    if cfg.hyperparameters.finetuning_type == "all_weights" and cfg.checkpoint.enabled:
        need += (cfg.checkpoint.keep_last + 1) * parameters * checkpoint_bytes_per_parameter(
            cfg.precision, cfg.hyperparameters.fp32_master_weights)
    return need


def checkpoint_bytes_per_parameter(precision: str, fp32_master_weights: bool = True) -> int:
    """A full fine-tune's checkpoint: the weights plus Adam's two fp32 moments, plus fp32 master weights when
    training in bf16 (``auto`` counts as bf16, the larger); bf16 weights and moments only without master weights."""
    if precision == "fp32":
        return 4 + 8
    return 2 + 4 + 8 if fp32_master_weights else 2 + 2 + 2


def _size_of(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class JobDirectory:
    path: Path

    @classmethod
    def create(cls, output_dir: str, cfg: Config, *, is_main: bool = True) -> "JobDirectory":
        """Make the job directory and write the resolved config. A directory that already holds a job is accepted
        only to resume it (unfinished, same settings).

        Only the main process (global rank 0; known from the launcher's RANK before torch.distributed starts)
        creates and checks it; the other ranks just point at it.
        """
        path = Path(output_dir).expanduser().resolve()
        if not is_main:
            return cls(path)
        check_output_dir(output_dir, cfg)  # a file in its place, no write permission, no free space
        if path.is_dir() and any(path.iterdir()):
            cls(path)._check_resumable(output_dir, cfg)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            if created:  # leave nothing behind for a job that never started
                shutil.rmtree(path, ignore_errors=True)
            raise PermissionError(f"output_dir={output_dir} is not writable: {err}") from err
        job = cls(path)
        job.write_atomic(CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return job

    def _check_resumable(self, output_dir: str, cfg: Config) -> None:
        """A non-empty output_dir is accepted only as an unfinished job with the same settings (resume)."""
        if (self.path / RESULT_FILE).exists():
            raise FileExistsError(f"output_dir={output_dir} holds a finished job ({RESULT_FILE}); choose a new "
                                  "output_dir or delete it.")
        if not (self.path / CONFIG_FILE).is_file():
            raise FileExistsError(f"output_dir={output_dir} is not empty and holds no job ({CONFIG_FILE} is "
                                  "missing); choose a new output_dir or empty it.")
        changed = config_changes(OmegaConf.load(self.path / CONFIG_FILE), cfg)
        if changed:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:5])
            raise FileExistsError(f"output_dir={output_dir} holds an unfinished job with other settings ({listed}); "
                                  "run with the same settings to resume it, or choose a new output_dir.")

    def latest_checkpoint(self) -> Optional[Path]:
        """The last complete resumable checkpoint, or None (a new job, or one stopped before its first)."""
        pointer = self.checkpoints_path / LATEST_CHECKPOINT_FILE
        if not pointer.is_file():
            return None
        found = self.checkpoints_path / pointer.read_text().strip()
        return found if found.is_dir() else None

    @property
    def checkpoints_path(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def adapter_path(self) -> Path:
        """The HF PEFT adapter of a LoRA job."""
        return self.path / ADAPTER_DIR

    @property
    def model_path(self) -> Path:
        """The exported HF model of a merged-LoRA or full fine-tuning job."""
        return self.path / MODEL_DIR

    def write_atomic(self, name: str, data: str | bytes) -> None:
        """Write ``name`` whole: a temporary file renamed over it, so readers see the old or the new file."""
        write_file_atomic(self.path / name, data)

    def write_result(self, result) -> None:
        self.write_atomic(RESULT_FILE, json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")


def write_file_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole (temporary file in the same directory, flushed to disk, renamed over it), with the
    permissions a plain ``open()`` would give (``mkstemp`` makes 0600, unreadable to the rest of a team)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    with (os.fdopen(fd, "wb") if isinstance(data, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def with_recorded_checkpoint_revision(cfg: Config) -> Config:
    """``cfg`` asking for the Hub commit that the unfinished job in its ``output_dir`` recorded
    (``model.checkpoint_revision``) when it names the same ``model.checkpoint`` and no commit of its own: a resumed
    job trains on the weights it started from, not on whatever was pushed to the repository since."""
    saved_file = Path(cfg.output_dir).expanduser() / CONFIG_FILE
    if not cfg.model.checkpoint or cfg.model.checkpoint_revision or not saved_file.is_file() \
            or (saved_file.parent / RESULT_FILE).exists():
        return cfg
    try:
        saved = OmegaConf.load(saved_file).get("model") or {}
    except Exception:  # an unreadable config.yaml: JobDirectory.create reports it
        return cfg
    if saved.get("checkpoint") != cfg.model.checkpoint or not saved.get("checkpoint_revision"):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              checkpoint_revision=saved.get("checkpoint_revision")))


def config_changes(saved, cfg: Config) -> List[Tuple[str, object, object]]:
    """``(key, saved value, new value)`` for every setting that differs, except ``RESUMABLE_CHANGES``."""
    old = _flatten(OmegaConf.to_container(saved, resolve=True))
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def peak_memory_gib(device_type: str) -> float:
    """Peak CUDA allocation (``cuda`` jobs) or peak resident memory of this process (``cpu`` jobs), in GiB."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
