"""``collate``: a micro batch of ``TokenizedExample``s -> right-padded, shifted tensors for the model;
``collate_packed``: a micro batch of packing bins -> one THD row with ``cu_seqlens``. ``collate_pairs`` and
``collate_packed_pairs`` do the same for preference pairs, keeping each pair's two sequences side by side and
saying which sequence each position belongs to."""

from __future__ import annotations

import math
from typing import Sequence, TypedDict

import torch

from nemo_customizer.data.examples import PADDING_EXAMPLE, TokenizedExample, TokenizedPair


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


class PackedBatch(Batch):
    """One packed micro batch: a single THD row ``[1, t]`` of whole examples back to back.

    ``tokens``/``labels``/``loss_mask`` are shifted *per example* (an example of ``n`` tokens gives ``n - 1``
    positions: its ``input_ids[:-1]`` as inputs, ``input_ids[1:]`` as labels), so no label crosses into the next
    example; ``position_ids`` restart at 0 for every example. Trailing padding (to ``pad_to_multiple_of``) is one
    more segment of its own, fully masked, so attention and RoPE are defined on every position.
    """

    cu_seqlens: torch.Tensor
    """``[segments + 1]`` int32: segment starts in the row, then ``t`` (padding, if any, is the last segment)."""
    max_seqlen: torch.Tensor
    """``[]`` int32: the longest segment (for varlen attention and RoPE tables)."""


def collate_packed(bins: Sequence[Sequence[TokenizedExample]], *, pad_id: int,
                   pad_to_multiple_of: int = 1) -> PackedBatch:
    """Join the examples of ``bins`` (a micro batch of packing bins) into one ``PackedBatch`` row.

    The loss over the row's masked positions equals the loss of the same examples in a padded ``collate`` batch:
    same inputs, targets and positions per example, and ``cu_seqlens`` keeps attention inside each example.
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    tokens: list[int] = []
    labels: list[int] = []
    loss_mask: list[int] = []
    positions: list[int] = []
    seqlens: list[int] = []
    for example in (e for b in bins for e in b):
        n = len(example.input_ids) - 1  # positions after the shift
        if n < 1:
            continue  # nothing to predict; an empty segment would only confuse varlen kernels
        tokens += example.input_ids[:-1]
        labels += example.input_ids[1:]
        loss_mask += example.loss_mask[1:]
        positions += range(n)
        seqlens.append(n)
    real = len(tokens)
    pad = max(1, math.ceil(real / pad_to_multiple_of)) * pad_to_multiple_of - real
    if pad:
        # Padding labels use pad_id (not -100): vocab-parallel cross entropy indexes with every label before masking.
        tokens += [pad_id] * pad
        labels += [pad_id] * pad
        loss_mask += [0] * pad
        positions += range(pad)
        seqlens.append(pad)
    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
    return PackedBatch(
        tokens=torch.tensor([tokens], dtype=torch.long),  # [1, t]
        labels=torch.tensor([labels], dtype=torch.long),  # [1, t]
        loss_mask=torch.tensor([loss_mask], dtype=torch.float32),  # [1, t]
        position_ids=torch.tensor([positions], dtype=torch.long),  # [1, t]
        num_real_tokens=torch.tensor(real, dtype=torch.long),
        cu_seqlens=cu_seqlens,  # [segments + 1]
        max_seqlen=torch.tensor(max(seqlens), dtype=torch.int32),
    )


PADDING_PAIR = TokenizedPair(chosen=PADDING_EXAMPLE, rejected=PADDING_EXAMPLE)
"""A pair of empty sequences: two fully masked rows of padding (fills the last validation batch of pairs); the
preference loss counts only pairs whose sequences both have loss tokens."""


class PairBatch(Batch):
    """A micro batch of preference pairs: their sequences in the order chosen0, rejected0, chosen1, rejected1, ...
    (rows of a padded batch, segments of a packed one)."""

    sequence_index: torch.Tensor
    """``[b, s]`` int64 (packed: ``[1, t]``): the sequence each position belongs to, in that order (pair ``i``'s
    chosen is ``2i``, its rejected ``2i + 1``); -1 on padding."""
    sequence_tokens: torch.Tensor
    """``[2 * pairs]`` float32: loss-masked positions of each sequence (0 for a ``PADDING_PAIR``'s)."""


class PackedPairBatch(PackedBatch, PairBatch):
    """``collate_packed_pairs``: one THD row of whole pairs, each sequence a segment of its own."""


def collate_pairs(pairs: Sequence[TokenizedPair], *, pad_id: int, pad_to_multiple_of: int = 1) -> PairBatch:
    """``collate`` of the pairs' sequences, chosen then rejected for each pair: ``[2 * pairs, s]`` rows."""
    sequences = _sequences(pairs)
    batch = collate(sequences, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    index = torch.full_like(batch["tokens"], -1)  # [b, s]
    for row, example in enumerate(sequences):
        index[row, :max(len(example.input_ids) - 1, 0)] = row
    return PairBatch(**batch, sequence_index=index, sequence_tokens=_loss_tokens(sequences))


def collate_packed_pairs(bins: Sequence[Sequence[TokenizedPair]], *, pad_id: int,
                         pad_to_multiple_of: int = 1) -> PackedPairBatch:
    """``collate_packed`` of the bins' pairs (``packing.plan_pair_packing``): one row whose segments are the
    sequences chosen0, rejected0, chosen1, ... of every bin in turn; attention and positions restart at each."""
    sequences = _sequences([pair for b in bins for pair in b])
    if any(len(example.input_ids) < 2 for example in sequences):
        # collate_packed leaves such a sequence out, which would shift the sequence index of every later one
        raise ValueError("a packed preference pair has a sequence with nothing to predict (fewer than 2 tokens)")
    batch = collate_packed([sequences], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    index = torch.full_like(batch["tokens"], -1)  # [1, t]
    bounds = batch["cu_seqlens"].tolist()
    for number in range(len(sequences)):  # the padding, if any, is the segment after the last sequence
        index[0, bounds[number]:bounds[number + 1]] = number
    return PackedPairBatch(**batch, sequence_index=index, sequence_tokens=_loss_tokens(sequences))


def _sequences(pairs: Sequence[TokenizedPair]) -> list[TokenizedExample]:
    return [example for pair in pairs for example in (pair.chosen, pair.rejected)]


def _loss_tokens(sequences: Sequence[TokenizedExample]) -> torch.Tensor:
    """``[sequences]`` float32: loss-masked positions after the shift (``loss_mask[1:]``) of each sequence."""
    return torch.tensor([float(sum(example.loss_mask[1:])) for example in sequences], dtype=torch.float32)
