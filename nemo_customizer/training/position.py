"""Where the training loop is: what a resumable checkpoint stores besides tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LoopPosition:
    """Enough to continue the same run exactly: the data order of an epoch is fixed by (seed, epoch), so the step
    count says where to resume; the rest restores early stopping, the best checkpoint's record and the totals.

    Unknown values are None, not NaN/inf: every rank's copy is compared when a checkpoint is saved.
    """

    steps: int = 0
    steps_per_epoch: int = 0
    global_batch_size: int = 0
    """Examples (or packed bins) per step: with ``steps_per_epoch``, a check that the data order is the same."""
    epochs_completed: int = 0
    last_validated_step: int = 0
    best_val_loss: Optional[float] = None
    best_epoch: Optional[int] = None
    best_step: Optional[int] = None
    final_train_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    early_stopping_best: Optional[float] = None
    early_stopping_best_at: int = -1
    bad_validations: int = 0
    tokens: int = 0
    seconds: float = 0.0
