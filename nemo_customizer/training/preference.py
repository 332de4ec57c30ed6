"""Direct preference optimization (``training_type: dpo``): the loss of preference pairs inside mcore's schedule, and
the reference log-probabilities it compares against.

Per pair, with ``π`` and ``ref`` the log-probabilities of a response's tokens (prompt tokens excluded) under the
policy being trained and the reference model, summed (or averaged: ``*_average_log_probs``)::

    reward    = β · (π - ref)                                   (chosen, rejected)
    loss      = preference_loss_weight · -log σ(reward_chosen - reward_rejected)
              + sft_loss_weight · -π_chosen
    accuracy  = reward_chosen > reward_rejected

The step's loss is the mean over the pairs of the global batch. The model returns the token losses of the loss
positions of a micro batch (both sequences of every pair in it: ``data.collate_pairs`` or ``collate_packed_pairs``);
``sequence_log_probs`` sums them per sequence, so one micro batch holds the whole of each of its pairs and the loss
is exact under tensor, sequence, pipeline and data parallelism alike.

The reference is the model before training: its log-probabilities are computed once, before the first step, by a
forward-only pass over the training and validation pairs (``reference_log_probs``): with LoRA with the adapters
switched off (``peft.lora.adapters_disabled``: the base model, no second copy of any weight), with all_weights
before any update. That costs one forward pass per pair once (no memory beyond a forward pass); a step then costs
the policy's forward and backward alone. They are stored in the job directory (``REFERENCE_FILE``), so a resumed
job reads the same values instead of computing them from trained weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nemo_customizer.config.schema import DpoConfig
from nemo_customizer.data import (PADDING_PAIR, TokenizedPair, collate_packed_pairs, collate_pairs,
                                  iterate_validation_micro_batches)
from nemo_customizer.training.objective import MicroBatch, model_token_losses

REFERENCE_FILE = "reference_log_probs.pt"


@dataclass(frozen=True)
class ScoredPair:
    """A preference pair and the reference model's summed log-probabilities of its chosen and rejected responses."""

    pair: TokenizedPair
    reference: Tuple[float, float] = (0.0, 0.0)


PADDING_SCORED_PAIR = ScoredPair(PADDING_PAIR)


def sequence_log_probs(token_losses: torch.Tensor, loss_sequence: torch.Tensor, sequences: int) -> torch.Tensor:
    """``(sequences,)`` float64: each sequence's summed token log-probabilities, from the token losses ``(n,)`` of the
    loss positions and the sequence ``(n,)`` each belongs to."""
    sums = torch.zeros(sequences, dtype=torch.float64, device=token_losses.device)
    return sums.index_add(0, loss_sequence, -token_losses.double())


def preference_terms(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, dpo: DpoConfig
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair ``(loss, reward of chosen, reward of rejected)``, each ``(pairs,)``, from the summed log-probs of
    the policy and the reference and the response tokens, each ``(pairs, 2)`` (chosen, rejected)."""
    counts = tokens.clamp(min=1)
    if dpo.preference_average_log_probs:
        policy_pref, reference_pref = policy / counts, reference / counts
    else:
        policy_pref, reference_pref = policy, reference
    rewards = dpo.ref_policy_kl_penalty * (policy_pref - reference_pref)  # (pairs, 2)
    loss = dpo.preference_loss_weight * -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    if dpo.sft_loss_weight:
        chosen = policy[:, 0] / counts[:, 0] if dpo.sft_average_log_probs else policy[:, 0]
        loss = loss + dpo.sft_loss_weight * -chosen
    return loss, rewards[:, 0], rewards[:, 1]


class PreferenceLoss:
    """The ``training.objective.Objective`` of ``training_type: dpo``: items are ``ScoredPair``s, the count is pairs,
    and the report adds the sums of the chosen and rejected rewards and of the correctly ordered pairs."""

    report_size = 5
    count_name = "pairs"
    padding = PADDING_SCORED_PAIR

    def __init__(self, dpo: DpoConfig):
        self.dpo = dpo
        # Validation reports the same sums: no token accuracy. The pairs' own measure of the policy is which
        # response it prefers (reward_accuracy), as TRL's DPO trainer logs it (it logs no token accuracy either).
        self.validation = self

    def collate(self, items: Sequence[ScoredPair], *, pad_id: int, pad_to_multiple_of: int) -> MicroBatch:
        batch = collate_pairs([item.pair for item in items], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
        return _with_reference(batch, items)

    def collate_packed(self, bins: Sequence[Sequence[ScoredPair]], *, pad_id: int,
                       pad_to_multiple_of: int) -> MicroBatch:
        batch = collate_packed_pairs([[item.pair for item in b] for b in bins], pad_id=pad_id,
                                     pad_to_multiple_of=pad_to_multiple_of)
        return _with_reference(batch, [item for b in bins for item in b])

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        return with_loss_sequence(batch)

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        return model_token_losses(model, batch), functools.partial(self._loss, batch)

    def _loss(self, batch: MicroBatch, token_losses: torch.Tensor):
        """mcore's 3-tuple: the summed loss of the micro batch's pairs, their number and the report."""
        tokens = batch["sequence_tokens"].view(-1, 2).double()  # (pairs, 2)
        policy = sequence_log_probs(token_losses, batch["loss_sequence"], tokens.numel()).view(-1, 2)
        loss, chosen, rejected = preference_terms(policy, batch["reference_log_probs"].view(-1, 2), tokens, self.dpo)
        real = (tokens > 0).all(dim=1).double()  # a padding pair counts nowhere
        total = (loss * real).sum()
        count = real.sum()
        report = torch.stack([total, count, (chosen * real).sum(), (rejected * real).sum(),
                              ((chosen > rejected).double() * real).sum()]).detach()
        return total.float(), count.to(torch.int), {"report": report}

    def metrics(self, report: Sequence[float], count: float, prefix: str = "") -> Dict[str, float]:
        chosen, rejected, correct = (value / max(count, 1) for value in report)
        return {f"{prefix}rewards_chosen": chosen, f"{prefix}rewards_rejected": rejected,
                f"{prefix}reward_accuracy": correct, f"{prefix}reward_margin": chosen - rejected}


def _with_reference(batch: MicroBatch, items: Sequence[ScoredPair]) -> MicroBatch:
    """``batch`` with ``reference_log_probs`` ``[2 * pairs]`` float64 in its sequences' order."""
    batch["reference_log_probs"] = torch.tensor([value for item in items for value in item.reference],
                                                dtype=torch.float64)
    return batch


def with_loss_sequence(batch: MicroBatch) -> MicroBatch:
    """``batch`` with ``loss_sequence`` ``(n,)``: the sequence of each loss position, in the order the model returns
    their losses (``models.gpt.loss_positions``: the flattened ``(s, b)`` layout), in place of ``sequence_index``.
    Read on the host, where ``loss_mask`` stays."""
    prepared = {key: value for key, value in batch.items() if key != "sequence_index"}
    at_loss = batch["loss_mask"].transpose(0, 1).flatten() > 0
    prepared["loss_sequence"] = batch["sequence_index"].transpose(0, 1).flatten()[at_loss]
    return prepared


# --- the reference ----------------------------------------------------------------------------------------------


class _SequenceLogProbs:
    """A forward-only ``Objective`` whose report is the summed log-probabilities of every sequence of a step, each
    at its place in the step (``batch["report_offset"]``): the schedule's sum over micro batches, data-parallel ranks
    and pipeline stages gathers the whole step's on every rank."""

    count_name = "sequences"

    def __init__(self, report_size: int):
        self.report_size = report_size

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        return with_loss_sequence(batch)

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        return model_token_losses(model, batch), functools.partial(self._report, batch)

    def _report(self, batch: MicroBatch, token_losses: torch.Tensor):
        sums = sequence_log_probs(token_losses, batch["loss_sequence"], batch["sequence_tokens"].numel())
        report = torch.zeros(self.report_size, dtype=torch.float64, device=token_losses.device)
        report[batch["report_offset"]:batch["report_offset"] + sums.numel()] = sums
        return token_losses.sum(), torch.zeros((), dtype=torch.int, device=token_losses.device), {"report": report}


@torch.no_grad()
def reference_log_probs(model, pairs: Sequence[TokenizedPair], *, batch_size: int, micro_batch_size: int, layout,
                        pad_id: int, pad_to_multiple_of: int) -> torch.Tensor:
    """``(pairs, 2)`` float64 on the host: the summed log-probabilities of each pair's chosen and rejected response
    under ``model`` with its LoRA adapters switched off (the base model; all_weights: the model as it is), on every
    rank. Collective: every rank of the job calls it with the same pairs; each data-parallel rank scores its share.
    """
    from nemo_customizer.peft.lora import adapters_disabled
    from nemo_customizer.training.step import forward_backward

    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    if not pairs:
        return table
    objective = _SequenceLogProbs(2 * batch_size)
    steps = iterate_validation_micro_batches(list(range(len(pairs))), global_batch_size=batch_size,
                                             micro_batch_size=micro_batch_size, dp_rank=layout.data_parallel_rank,
                                             dp_size=layout.data_parallel_size, padding=-1)
    was_training = model.training
    model.eval()  # no dropout
    with adapters_disabled(model):
        for step, micro_batches in enumerate(steps):
            share = sum(len(indices) for indices in micro_batches)  # this rank's pairs of the step (padding too)
            batches = []
            for number, indices in enumerate(micro_batches):
                batch = collate_pairs([pairs[i] if i >= 0 else PADDING_PAIR for i in indices], pad_id=pad_id,
                                      pad_to_multiple_of=pad_to_multiple_of)
                batch["report_offset"] = 2 * (layout.data_parallel_rank * share + number * micro_batch_size)
                batches.append(batch)
            sums = forward_backward(model, batches, layout.device, forward_only=True, objective=objective)
            first = step * batch_size
            rows = min(batch_size, len(pairs) - first)
            table[first:first + rows] = sums.view(-1, 2)[:rows].cpu()
    model.train(was_training)
    return table


def pairs_fingerprint(train: Sequence[TokenizedPair], val: Sequence[TokenizedPair]) -> str:
    """A digest of the pairs' tokens and masks: a stored reference belongs to exactly these pairs."""
    digest = hashlib.sha256()
    for split in (train, val):
        digest.update(np.int64(len(split)).tobytes())
        for pair in split:
            for sequence in (pair.chosen, pair.rejected):
                digest.update(np.int64(len(sequence.input_ids)).tobytes())
                digest.update(np.asarray(sequence.input_ids, dtype=np.int64).tobytes())
                digest.update(np.asarray(sequence.loss_mask, dtype=np.int8).tobytes())
    return digest.hexdigest()


def scored_pairs(model, train: Sequence[TokenizedPair], val: Sequence[TokenizedPair], *, job_dir: Path,
                 resumed: bool, all_weights: bool, batch_size: int, micro_batch_size: int, layout, pad_id: int,
                 pad_to_multiple_of: int, log: Callable[[str], None] = lambda text: None
                 ) -> Tuple[List[ScoredPair], List[ScoredPair]]:
    """The training and validation pairs with their reference log-probabilities: read from ``job_dir``'s
    ``REFERENCE_FILE`` when it holds these pairs', else computed (``reference_log_probs``) and stored there (main
    rank). A resumed all_weights job has trained its weights already: without the stored values it stops."""
    path = job_dir / REFERENCE_FILE
    fingerprint = pairs_fingerprint(train, val)
    saved = _read_reference(path, fingerprint)
    if saved is None:
        if resumed and all_weights:
            raise RuntimeError(f"{path} is missing or was written for other pairs: the reference log-probabilities "
                               "of a full fine-tune come from the weights before training, and this job's weights "
                               "are trained already. Resume with the same data, or start a new output_dir.")
        log(f"reference log-probabilities: one forward pass over {len(train)} training and {len(val)} validation "
            "pairs" + (" (LoRA adapters switched off)" if not all_weights else ""))
        common = dict(batch_size=batch_size, micro_batch_size=micro_batch_size, layout=layout, pad_id=pad_id,
                      pad_to_multiple_of=pad_to_multiple_of)
        saved = {"fingerprint": fingerprint, "train": reference_log_probs(model, train, **common),
                 "val": reference_log_probs(model, val, **common)}
        if layout.is_main:
            _write_reference(path, saved)
    else:
        log(f"reference log-probabilities: read from {path}")
    return _scored(train, saved["train"]), _scored(val, saved["val"])


def _scored(pairs: Sequence[TokenizedPair], table: torch.Tensor) -> List[ScoredPair]:
    return [ScoredPair(pair, (chosen, rejected)) for pair, (chosen, rejected) in zip(pairs, table.tolist())]


def _read_reference(path: Path, fingerprint: str) -> Optional[dict]:
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    return saved if saved.get("fingerprint") == fingerprint else None


def _write_reference(path: Path, saved: dict) -> None:
    """Written whole or not at all: a temporary file renamed over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
