"""Log-probabilities of given tokens under a model: the scoring half of evaluation (loss, perplexity, ranking labels,
lm-evaluation-harness's loglikelihood requests), where generation is the other half.

Sequences are scored in right-padded batches: with causal attention a real position never sees the padding after
it, so each row's scores equal those of the row run alone. Rows are sorted by length first, so a batch pads little.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass(frozen=True)
class TokenScores:
    """Scores of one sequence's target tokens, in order."""

    logprobs: List[float]
    """``log p(token_i | tokens_<i)`` of each target token (natural log)."""
    greedy: List[bool]
    """Whether each target token is the model's most likely next token (ties count as greedy)."""

    @property
    def total(self) -> float:
        """Log-probability of all target tokens together."""
        return float(sum(self.logprobs))

    @property
    def all_greedy(self) -> bool:
        """Whether greedy decoding from the context would produce exactly the target tokens."""
        return all(self.greedy)


@torch.inference_mode()
def score_targets(model: torch.nn.Module, sequences: Sequence[Sequence[int]], target_masks: Sequence[Sequence[int]],
                  *, device: torch.device, batch_tokens: int = 2048) -> List[TokenScores]:
    """Scores of the target tokens of every sequence: ``target_masks[k][i] == 1`` marks token ``i`` of sequence ``k``
    as a target, predicted from tokens ``0..i-1`` (so ``target_masks[k][0]`` must be 0).

    ``batch_tokens`` bounds the padded tokens per forward (rows × longest row); a longer row runs alone. A forward
    holds ``batch_tokens × vocab`` logits in the model's dtype (only the target positions' are taken to fp32), so
    this bounds the memory scoring adds to the model's.
    """
    from nemo_customizer.models.gpt import forward_logits

    for k, (ids, mask) in enumerate(zip(sequences, target_masks, strict=True)):
        if len(ids) != len(mask):
            raise ValueError(f"sequence {k} has {len(ids)} tokens but its target mask has {len(mask)}")
        if mask and mask[0]:
            raise ValueError(f"sequence {k}: its first token cannot be a target (nothing precedes it)")
    results: List[TokenScores] = [TokenScores([], [])] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k]))
    for batch in _length_batches(order, [len(s) for s in sequences], batch_tokens):
        width = max(max(len(sequences[k]) for k in batch) - 1, 1)
        tokens = torch.zeros((len(batch), width), dtype=torch.long)  # [b, s] inputs: ids[:-1], right-padded
        targets = torch.zeros((len(batch), width), dtype=torch.long)  # [b, s] ids[1:]
        selected = torch.zeros((len(batch), width), dtype=torch.bool)  # [b, s] positions whose next token is scored
        for row, k in enumerate(batch):
            ids, n = sequences[k], len(sequences[k]) - 1
            if n < 1:
                continue
            tokens[row, :n] = torch.tensor(ids[:-1])
            targets[row, :n] = torch.tensor(ids[1:])
            selected[row, :n] = torch.tensor(target_masks[k][1:], dtype=torch.bool)
        logits = forward_logits(model, tokens.to(device))  # [b, s, vocab]
        picked = logits[selected.to(device)].float()  # [n_targets, vocab]
        logprobs = torch.log_softmax(picked, dim=-1)
        wanted = targets[selected].to(device)  # [n_targets]
        target_logprobs = logprobs.gather(1, wanted[:, None]).squeeze(1)
        greedy = logprobs.max(dim=-1).values <= target_logprobs
        target_logprobs, greedy = target_logprobs.cpu().tolist(), greedy.cpu().tolist()
        counts = selected.sum(dim=1).tolist()
        start = 0
        for row, k in enumerate(batch):
            results[k] = TokenScores(target_logprobs[start:start + counts[row]], greedy[start:start + counts[row]])
            start += counts[row]
    return results


def _length_batches(order: Sequence[int], lengths: Sequence[int], batch_tokens: int) -> List[List[int]]:
    """``order`` (ascending lengths) cut into batches whose rows × longest row stays within ``batch_tokens``."""
    batches: List[List[int]] = []
    for k in order:
        if batches and (len(batches[-1]) + 1) * lengths[k] <= batch_tokens:
            batches[-1].append(k)
        else:
            batches.append([k])
    return batches
