"""What a training step minimizes: the ``Objective`` contract, and the supervised one (``TokenMeanLoss``).

An objective turns the training items (examples, or preference pairs with their reference log-probabilities) into
micro batches, and the per-token losses the model returns for one micro batch into mcore's loss-function 3-tuple:
the sum to backpropagate, its count, and a report vector. ``training.step`` runs mcore's schedule with it, sums the
reports over the micro batches, the data-parallel ranks and the pipeline stages, and divides the gradients by the
global count: the step's loss is the mean over the global batch of what the count counts (loss tokens; pairs).
Validation runs an objective's ``validation`` twin, which may report what only a forward pass without gradients
measures (the supervised one: how many target tokens are the model's argmax prediction, ``mean_token_accuracy``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Protocol, Sequence, Tuple

import torch

from nemo_customizer.data import PADDING_EXAMPLE, collate, collate_packed
from nemo_customizer.models.gpt import LossPositions, loss_positions

MicroBatch = Dict[str, Any]


class Objective(Protocol):
    report_size: int
    """Length of the report vector: ``[loss sum, count, extra sums ...]``."""
    count_name: str
    """What the count counts, as the ``train`` records of metrics.jsonl name it (``loss_tokens``, ``pairs``)."""
    padding: object
    """The item that fills the last validation batch (adds nothing to any sum)."""
    validation: "Objective"
    """The objective of validation passes (no gradients): the same loss and count, its own report and metrics."""

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


def model_token_losses(model, batch: MicroBatch, token_hits: bool = False):
    """The per-token losses ``(n,)`` at the loss positions of ``batch`` (``models.gpt.CustomizerGPTModel``); on a
    pipeline stage before the last, its output activations. ``token_hits`` (without gradients): ``(losses, hits)``
    on the last stage, ``hits`` (n,) bool: each position's argmax prediction is its target."""
    loss_mask = batch["loss_mask"]
    if token_hits:
        loss_mask = LossPositions(loss_positions(loss_mask, batch["tokens"].device), token_hits=True)
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=loss_mask,
                 packed_seq_params=batch.get("packed_seq_params"))


class TokenMeanLoss:
    """Supervised fine-tuning: the mean token loss over every loss-masked token of the global batch.

    ``token_hits`` (its ``validation`` twin): the report adds the loss tokens whose argmax prediction is the target,
    and ``metrics`` their share, ``mean_token_accuracy`` as TRL's SFT trainer logs it. Training steps do not count
    them: the training loss head keeps no logits to take an argmax of (``models.loss``).
    """

    count_name = "loss_tokens"
    padding = PADDING_EXAMPLE

    def __init__(self, token_hits: bool = False):
        self.token_hits = token_hits
        self.report_size = 3 if token_hits else 2
        self.validation = self if token_hits else TokenMeanLoss(token_hits=True)

    def collate(self, items, *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        return collate(items, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)

    def collate_packed(self, bins, *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        return collate_packed(bins, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        return batch

    def forward_step(self, data_iterator, model):
        return model_token_losses(model, next(data_iterator), token_hits=self.token_hits), _token_sum

    def metrics(self, report: Sequence[float], count: float, prefix: str = "") -> Dict[str, float]:
        if not self.token_hits or not report:  # a CUDA-graphed training step reports the loss and count only
            return {}
        return {f"{prefix}mean_token_accuracy": report[0] / count if count else math.nan}


def _token_sum(output):
    """mcore's 3-tuple contract: (summed loss to backprop, token count, values to report). ``output``: the token
    losses ``(n,)``, or ``(losses, hits)`` (``token_hits``: the hits' count is reported too)."""
    token_losses, hits = output if isinstance(output, tuple) else (output, None)
    total = token_losses.sum()
    # torch.full, not torch.tensor: a value copied from the host would make the host wait mid-step.
    count = torch.full((), token_losses.numel(), dtype=torch.int, device=token_losses.device)
    report = [total.detach().double(), count.double()] + ([] if hits is None else [hits.sum().double()])
    return total, count, {"report": torch.stack(report)}


TOKEN_MEAN = TokenMeanLoss()
