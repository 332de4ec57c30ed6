"""Customization jobs of the tiny random Llama (``tests/_tiny.py``) on its classification data, each run once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from _tiny import train_losses



@dataclass
class TinyJobs:
    """Jobs under ``root`` (which holds ``model/`` and ``data/``), keyed by name: tests that compare the same job with
    others share one run of it, whatever order they run in."""

    root: Path
    _runs: dict = field(default_factory=dict)
    """name → (the settings it ran with, its per-step train losses)."""

    def losses(self, name: str, device: str, precision: str, finetuning: str, model: dict | None = None,
               **hyperparameters) -> list[float]:
        """Per-step train losses of job ``name``: 10 steps of 8 examples unless ``hyperparameters`` say otherwise.

        CPU and CUDA jobs run in this one process, in whatever order the tests ask for them: the CPU adaptations of
        megatron-core last only as long as a CPU job's parallel state, so a CUDA job after one is a check of that.
        """
        settings = dict(device=device, precision=precision, finetuning=finetuning, model=model, **hyperparameters)
        if name in self._runs:
            ran_with, losses = self._runs[name]
            assert ran_with == settings, f"job {name} already ran with other settings: {ran_with}"
            return losses
        kwargs = dict(
            config="tiny-llama-test", dataset=str(self.root / "data"), output_dir=str(self.root / name), device=device,
            precision=precision, progress_bar=False,
            hyperparameters={"finetuning_type": finetuning, "epochs": 1, "batch_size": 8, "micro_batch_size": 4,
                             "learning_rate": 1e-3, "max_steps": 10, "lora": {"adapter_dropout": 0.0},
                             **hyperparameters},
            model={"checkpoint": str(self.root / "model"), "random_weights": False, **(model or {})})
        from nemo_customizer.api import customize

        customize(**kwargs)
        losses = train_losses(self.root / name)
        self._runs[name] = (settings, losses)
        return losses

    def adapter(self, name: str) -> Path:
        """The adapter a LoRA job exported."""
        assert name in self._runs, f"job {name} has not run"
        return self.root / name / "adapter"

