"""Early stopping on validation loss, and which validation is the best so far."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Stop after ``patience`` validations without an improvement larger than ``min_delta``.

    ``update`` returns True when this validation is the new best (the caller saves the best checkpoint then). The
    training loop keeps it in its ``LoopState``, so checkpoints save where it stands.
    """

    patience: int = 10
    min_delta: float = 0.001
    enabled: bool = True
    best: float = math.inf
    best_at: int = -1
    bad_validations: int = 0

    def update(self, val_loss: float, at: int) -> bool:
        if not math.isfinite(val_loss):
            self.bad_validations += 1
            return False
        if val_loss < self.best - self.min_delta or self.best_at < 0:
            self.best, self.best_at, self.bad_validations = val_loss, at, 0
            return True
        self.bad_validations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.bad_validations >= self.patience
