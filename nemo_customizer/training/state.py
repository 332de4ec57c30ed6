"""Where the training loop is: the one record of a job's progress that checkpoints save and results come from.

``LoopState`` is saved whole in every resumable checkpoint (``to_checkpoint`` / ``from_checkpoint``): a field added
here is saved and restored without another edit. ``result_fields`` and ``status_fields`` are the only places that
turn it into a job's result (``CustomizationResult``, ``result.json``) and into ``status.json``.

Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional

from nemo_customizer.training.early_stopping import EarlyStopping


@dataclass
class LoopState:
    """Enough to continue the same run exactly: the data order of an epoch is fixed by (seed, epoch), so the step
    count says where to resume; the rest restores early stopping, the best checkpoint's record and the totals."""

    steps: int = 0
    """Optimizer steps trained and read."""
    steps_per_epoch: int = 0
    global_batch_size: int = 0
    """Examples (or packed bins) per step: with ``steps_per_epoch``, a resumed run checks its data order is the same."""
    last_validated_step: int = 0
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    """The rule and where it stands; its ``best`` and ``best_at`` are the best validation's loss and step."""
    best_train_loss: float = math.nan
    """The training loss of the best validation's step."""
    final_train_loss: float = math.nan
    final_val_loss: float = math.nan
    stopped_early: bool = False
    tokens: int = 0
    """Non-padding tokens trained, all ranks together (a resumed job continues the totals)."""
    seconds: float = 0.0
    """Time spent in training steps (validation and checkpoints excluded)."""
    stop_signal: Optional[int] = None
    """SIGTERM or SIGINT, when a stop signal or a cancel request (as SIGTERM) ended training (status ``cancelled``)."""
    stop_reason: str = ""
    """What ended training early: ``SIGTERM``, ``SIGINT`` or ``cancel request``."""

    @property
    def epochs_completed(self) -> int:
        return self.steps // self.steps_per_epoch if self.steps_per_epoch else 0

    @property
    def epoch(self) -> int:
        """The epoch of the latest step (0 before any)."""
        return (self.steps - 1) // self.steps_per_epoch if self.steps and self.steps_per_epoch else 0

    @property
    def best_val_loss(self) -> float:
        return self.early_stopping.best

    @property
    def best_step(self) -> Optional[int]:
        return self.early_stopping.best_at if self.early_stopping.best_at >= 0 else None

    @property
    def best_epoch(self) -> Optional[int]:
        return None if self.best_step is None else (self.best_step - 1) // self.steps_per_epoch

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def add_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        """Count a trained step whose numbers were read."""
        self.steps, self.final_train_loss = step, loss
        self.tokens += tokens
        self.seconds += seconds

    def add_validation(self, val_loss: float) -> bool:
        """Count a validation of the latest step; True when it is the new best (the caller saves the weights)."""
        self.final_val_loss = val_loss
        improved = self.early_stopping.update(val_loss, self.steps)
        if improved:
            self.best_train_loss = self.final_train_loss
        return improved

    # --- what the job reports ------------------------------------------------------------------------------------

    def result_fields(self) -> dict:
        """The training fields of ``api.CustomizationResult`` (and ``result.json``)."""
        return dict(steps=self.steps, epochs_completed=self.epochs_completed, best_epoch=self.best_epoch,
                    best_step=self.best_step, best_val_loss=self.best_val_loss,
                    final_train_loss=self.final_train_loss, final_val_loss=self.final_val_loss,
                    stopped_early=self.stopped_early, tokens_per_second=self.tokens_per_second,
                    train_seconds=self.seconds)

    def status_fields(self) -> dict:
        """The progress and best-checkpoint fields of ``status.json`` (JSON has no NaN: unknown losses are null)."""
        return dict(steps_completed=self.steps, best_epoch=self.best_epoch, best_step=self.best_step,
                    val_loss=_finite_or_none(self.best_val_loss), train_loss=_finite_or_none(self.best_train_loss))

    # --- checkpoint ----------------------------------------------------------------------------------------------

    def to_checkpoint(self) -> dict:
        """Every field as plain values, NaN/inf as strings: a checkpoint's common state is compared across ranks
        when it is saved, and NaN never equals itself."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "LoopState":
        """The state ``to_checkpoint`` saved (a field missing from an older checkpoint takes its default); also reads
        the flat position that checkpoints held before ``LoopState`` (``early_stopping_best`` ...), so a job
        interrupted under an earlier version resumes. The early-stopping rule itself (patience, min_delta, enabled)
        is the run's config: the loop sets it after loading."""
        if "early_stopping_best" in saved and "early_stopping" not in saved:
            return _from_flat_position(saved)
        return _build(cls, saved)


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": float() reads them back
    return value


def _build(cls, saved: dict):
    types = typing.get_type_hints(cls)
    unknown = sorted(set(saved) - set(types))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}: the checkpoint was written by another version")
    return cls(**{name: _build(types[name], value) if dataclasses.is_dataclass(types[name])
                  else float(value) if isinstance(value, str) and types[name] in (float, Optional[float]) else value
                  for name, value in saved.items()})


def _from_flat_position(saved: dict) -> LoopState:
    """The earlier checkpoint layout: one flat record, unknown losses as None (the epoch and best-step fields it
    also held are derived here)."""
    def loss(name: str, default: float) -> float:
        return default if saved.get(name) is None else float(saved[name])

    stopping = EarlyStopping(best=loss("early_stopping_best", math.inf), best_at=saved.get("early_stopping_best_at", -1),
                             bad_validations=saved.get("bad_validations", 0))
    return LoopState(steps=saved["steps"], steps_per_epoch=saved["steps_per_epoch"],
                     global_batch_size=saved["global_batch_size"], last_validated_step=saved["last_validated_step"],
                     early_stopping=stopping, final_train_loss=loss("final_train_loss", math.nan),
                     final_val_loss=loss("final_val_loss", math.nan), tokens=saved.get("tokens", 0),
                     seconds=saved.get("seconds", 0.0))


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None
