"""What a training step minimizes: the ``Objective`` contract, and the supervised one (``TokenMeanLoss``).

An objective turns the training items (examples, or preference pairs with their reference log-probabilities) into
micro batches, and the per-token losses the model returns for one micro batch into mcore's loss-function 3-tuple:
the sum to backpropagate, its count, and a report vector. ``training.step`` runs mcore's schedule with it, sums the
reports over the micro batches, the data-parallel ranks and the pipeline stages, and divides the gradients by the
global count: the step's loss is the mean over the global batch of what the count counts (loss tokens; pairs).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Protocol, Sequence, Tuple

import torch

from nemo_customizer.data import PADDING_EXAMPLE, collate, collate_packed

MicroBatch = Dict[str, Any]


class Objective(Protocol):
    report_size: int
    """Length of the report vector: ``[loss sum, count, extra sums ...]``."""
    count_name: str
    """What the count counts, as the ``train`` records of metrics.jsonl name it (``loss_tokens``, ``pairs``)."""
    padding: object
    """The item that fills the last validation batch (adds nothing to any sum)."""

    def collate(self, items: Sequence, *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        """A padded micro batch of training items."""

    def collate_packed(self, bins: Sequence[Sequence], *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        """A packed micro batch (one THD row) of bins of training items."""

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        """The host-side batch (after the pipeline's uniform padding) as the loss function reads it."""

    def forward_step(self, data_iterator, model) -> Tuple[torch.Tensor, Callable]:
        """mcore's ``forward_step_func``: the model's per-token losses and the loss function of that micro batch."""

    def metrics(self, report: Sequence[float], count: float, prefix: str = "") -> Dict[str, float]:
        """The extra sums of a (global) report as named means, for metrics.jsonl and status.json."""


def model_token_losses(model, batch: MicroBatch) -> torch.Tensor:
    """The per-token losses ``(n,)`` at the loss positions of ``batch`` (``models.gpt.CustomizerGPTModel``); on a
    pipeline stage before the last, its output activations."""
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"],
                 packed_seq_params=batch.get("packed_seq_params"))


class TokenMeanLoss:
    """Supervised fine-tuning: the mean token loss over every loss-masked token of the global batch."""

    report_size = 2
    count_name = "loss_tokens"
    padding = PADDING_EXAMPLE

    def collate(self, items, *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        return collate(items, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)

    def collate_packed(self, bins, *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        return collate_packed(bins, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        return batch

    def forward_step(self, data_iterator, model):
        return model_token_losses(model, next(data_iterator)), _token_sum

    def metrics(self, report: Sequence[float], count: float, prefix: str = "") -> Dict[str, float]:
        return {}


def _token_sum(token_losses: torch.Tensor):
    """mcore's 3-tuple contract: (summed loss to backprop, token count, values to report)."""
    total = token_losses.sum()
    # torch.full, not torch.tensor: a value copied from the host would make the host wait mid-step.
    count = torch.full((), token_losses.numel(), dtype=torch.int, device=token_losses.device)
    return total, count, {"report": torch.stack([total.detach().double(), count.double()])}


TOKEN_MEAN = TokenMeanLoss()
