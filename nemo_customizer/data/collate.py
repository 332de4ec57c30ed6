"""``collate``: a micro batch of ``TokenizedExample``s -> right-padded, shifted tensors for the model."""

from __future__ import annotations

import math
from typing import Sequence, TypedDict

import torch

from nemo_customizer.data.examples import TokenizedExample


class Batch(TypedDict):
    """One micro batch. ``s`` is the longest example minus one (the shift), rounded up to ``pad_to_multiple_of``."""

    tokens: torch.Tensor
    """``[b, s]`` int64: model inputs ``input_ids[:-1]``, then ``pad_id``."""
    labels: torch.Tensor
    """``[b, s]`` int64: next-token targets ``input_ids[1:]``, then ``pad_id``."""
    loss_mask: torch.Tensor
    """``[b, s]`` float32: ``loss_mask[1:]`` (1 where ``labels`` is a completion token), 0 on padding."""
    position_ids: torch.Tensor
    """``[b, s]`` int64: ``0 .. s-1`` on every row."""
    num_real_tokens: torch.Tensor
    """``[]`` int64: non-padding positions of ``tokens`` (for tokens/s; read it before moving the batch to a GPU)."""


def collate(examples: Sequence[TokenizedExample], *, pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Stack ``examples`` into one ``Batch``, right-padded with ``pad_id``.

    ``pad_to_multiple_of`` rounds the sequence length up, e.g. to the tensor-parallel size, which sequence parallelism
    needs to split the sequence evenly. No attention mask is built: with causal attention and padding on the right,
    real positions never attend to padding, and padded positions carry no loss.
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [max(len(e.input_ids) - 1, 0) for e in examples]  # positions after the shift
    # At least one column, so a micro batch of padding rows still has a valid shape.
    seq_len = max(1, math.ceil(max(lengths, default=0) / pad_to_multiple_of)) * pad_to_multiple_of
    shape = (len(examples), seq_len)

    tokens = torch.full(shape, pad_id, dtype=torch.long)  # [b, s]
    # Padding labels use pad_id (not -100): vocab-parallel cross entropy indexes with every label before masking.
    labels = torch.full(shape, pad_id, dtype=torch.long)  # [b, s]
    loss_mask = torch.zeros(shape, dtype=torch.float32)  # [b, s]
    for row, (example, n) in enumerate(zip(examples, lengths)):
        if n == 0:
            continue
        ids = torch.tensor(example.input_ids, dtype=torch.long)  # [n + 1]
        tokens[row, :n] = ids[:-1]
        labels[row, :n] = ids[1:]
        loss_mask[row, :n] = torch.tensor(example.loss_mask[1:], dtype=torch.float32)
    position_ids = torch.arange(seq_len, dtype=torch.long).repeat(len(examples), 1)  # [b, s]
    return Batch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids,
        num_real_tokens=torch.tensor(sum(lengths), dtype=torch.long),
    )
