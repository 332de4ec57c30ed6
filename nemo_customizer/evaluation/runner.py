"""One model (base or customized) on a held-out set: scores from token log-probabilities, answers from greedy
generation with the inference engine, then the task metrics."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_customizer.data.examples import TokenizedExample
from nemo_customizer.evaluation.heldout import HeldOutSet, label_completions, prompt_ids
from nemo_customizer.evaluation.metrics import METRICS, compute_generation_metrics

MAX_TOKENS_MARGIN = 16
"""Default ``max_tokens``: the longest reference answer's tokens plus this, so answers are never cut short."""


@dataclass(frozen=True)
class EvaluationOptions:
    """How to evaluate; ``metrics`` are already checked against the data (``metrics.check_metrics``)."""

    metrics: tuple[str, ...]
    max_tokens: Optional[int] = None
    stop: tuple[str, ...] = ()
    batch_size: int = 16
    progress: bool = True


@dataclass(frozen=True)
class ModelEvaluation:
    """One model's results on the held-out set."""

    model: str
    """``base`` or ``customized``."""
    metrics: dict[str, float]
    predictions: list[str]
    """The generated answers (chat: the reply's content), in row order."""
    predicted_calls: Optional[list[list[dict]]] = None
    """Chat: the tool calls parsed from each reply."""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    """``completion_tokens`` (tokens scored for loss), ``max_tokens`` (the generation limit used)."""


def evaluate_generator(generator, heldout: HeldOutSet, tokenized: list[TokenizedExample],
                       options: EvaluationOptions, model: str) -> ModelEvaluation:
    """Score and answer every held-out row with ``generator``'s model (with whatever adapter it has)."""
    from nemo_customizer.inference.scoring import score_targets

    started = time.perf_counter()
    scores = score_targets(generator.model, [t.input_ids for t in tokenized], [t.loss_mask for t in tokenized],
                           device=generator.device)
    target_tokens = sum(len(s.logprobs) for s in scores)
    loss = -sum(s.total for s in scores) / max(target_tokens, 1)  # the mean over tokens, as validation loss is
    metrics: dict[str, float] = {}
    if "loss" in options.metrics:
        metrics["loss"] = loss
    if "perplexity" in options.metrics:
        metrics["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float above ~709
    if "label_logprob_accuracy" in options.metrics:
        metrics["label_logprob_accuracy"] = _label_logprob_accuracy(generator, heldout, tokenized)
    max_tokens = options.max_tokens or max(sum(t.loss_mask) for t in tokenized) + MAX_TOKENS_MARGIN
    predictions, calls = _generate(generator, heldout, tokenized, options, max_tokens, model)
    metrics.update(compute_generation_metrics(
        [name for name in options.metrics if METRICS[name].source == "generation"], predictions, heldout.references,
        labels=heldout.labels, predicted_calls=calls, reference_calls=heldout.reference_calls))
    ordered = {name: metrics[name] for name in options.metrics if name in metrics}
    return ModelEvaluation(model=model, metrics=ordered, predictions=predictions, predicted_calls=calls,
                           seconds=time.perf_counter() - started,
                           details={"completion_tokens": target_tokens, "max_tokens": max_tokens})


def _label_logprob_accuracy(generator, heldout: HeldOutSet, tokenized: list[TokenizedExample]) -> float:
    """Share of rows whose reference label has the highest log-probability (completion tokens and EOS, as trained)
    among all labels: the model's choice, whatever it would have generated around it."""
    from nemo_customizer.inference.scoring import score_targets

    eos = generator.tokenizer.eos_token_id
    labels = label_completions(heldout)
    label_ids = {label: generator.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
                 for label, text in labels.items()}
    sequences, masks, owners = [], [], []
    for row, example in enumerate(tokenized):
        prompt = prompt_ids(example)
        for label, ids in label_ids.items():
            sequences.append(prompt + ids)
            masks.append([0] * len(prompt) + [1] * len(ids))
            owners.append((row, label))
    totals = [s.total for s in score_targets(generator.model, sequences, masks, device=generator.device)]
    best: dict[int, tuple[float, str]] = {}
    for (row, label), total in zip(owners, totals):
        if row not in best or total > best[row][0]:
            best[row] = (total, label)
    correct = sum(best[row][1] == reference.strip() for row, reference in enumerate(heldout.references))
    return correct / len(heldout.references)


def _generate(generator, heldout: HeldOutSet, tokenized: list[TokenizedExample], options: EvaluationOptions,
              max_tokens: int, model: str) -> tuple[list[str], Optional[list[list[dict]]]]:
    """Greedy answers to every row, ``batch_size`` rows at a time, with a progress bar on stderr."""
    from nemo_customizer.inference.chat import chat_completion

    chat = heldout.format == "chat"
    prompts, eos_ids, syntaxes, reasoning = [], [], [], False
    for row, example in enumerate(tokenized):
        if chat:
            conversation = heldout.examples[row]
            ids, template = generator.chat_prompt(heldout.prompt_messages(row), conversation.tools)
            prompts.append(ids)
            eos_ids.append(generator.eos_ids | template.end_of_turn_ids)
            syntaxes.append(template.tool_syntax if conversation.tools else None)
            reasoning = template.reasoning  # one template renders every row
        else:
            prompts.append(prompt_ids(example))
            eos_ids.append(None)
    bar = _progress(len(prompts), f"{model}: generating", options.progress)
    answers = []
    for first in range(0, len(prompts), options.batch_size):
        chunk = slice(first, first + options.batch_size)
        # rows of one chunk share their end-of-turn ids: one template renders every row of a file
        answers += generator.complete_ids(prompts[chunk], max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                          stop=list(options.stop) or None, seed=None,
                                          batch_size=options.batch_size, eos_ids=eos_ids[first])
        bar.update(len(prompts[chunk]))
    bar.close()
    if not chat:
        return [answer.text.strip() for answer in answers], None
    # A reasoning model's <think> block is not its answer: metrics score the content after it.
    replies = [chat_completion(answer, tool_syntax=syntax, reasoning=reasoning).message
               for answer, syntax in zip(answers, syntaxes)]
    return [(reply.get("content") or "").strip() for reply in replies], [list(reply.get("tool_calls") or [])
                                                                        for reply in replies]


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="row", file=sys.stderr, disable=not enabled, leave=False)
