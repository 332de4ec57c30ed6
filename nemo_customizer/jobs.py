"""The job directory: resolved config, metrics, adapter, result. Checked before any training starts."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from nemo_customizer.config import Config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


@dataclasses.dataclass(frozen=True)
class JobDirectory:
    path: Path

    @classmethod
    def create(cls, output_dir: str, cfg: Config, *, is_main: bool = True) -> "JobDirectory":
        """Make the job directory (refusing one that already holds a job) and write the resolved config.

        Only the main process (global rank 0; known from the launcher's RANK before torch.distributed starts)
        creates and checks it; the other ranks just point at it.
        """
        path = Path(output_dir).expanduser().resolve()
        if not is_main:
            return cls(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"output_dir={output_dir} is a file; choose a directory path.")
        if path.is_dir() and any(path.iterdir()):
            raise FileExistsError(f"output_dir={output_dir} is not empty (it holds an earlier job); choose a new "
                                  "output_dir or delete it.")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"output_dir={output_dir} is not writable: {err}") from err
        if shutil.disk_usage(path).free < 256 * 2**20:
            raise OSError(f"output_dir={output_dir}: less than 256 MiB free on its disk; free space first.")
        job = cls(path)
        job.write_atomic(CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return job

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

    def write_atomic(self, name: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, self.path / name)

    def write_result(self, result) -> None:
        self.write_atomic(RESULT_FILE, json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")


def peak_memory_gib(device_type: str) -> float:
    """Peak CUDA allocation (``cuda`` jobs) or peak resident memory of this process (``cpu`` jobs), in GiB."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
