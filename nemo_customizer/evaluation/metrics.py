"""Task metrics for held-out evaluation: pure functions of generated texts (or tool calls) and their references.

No torch here, so the registry and config checks import instantly; ``sacrebleu`` and ``rouge_score`` (the
``eval`` extra) load only inside the metric that needs them. ``loss``, ``perplexity`` and
``label_logprob_accuracy`` are registered here but computed by the runner from per-token log-probabilities.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

DATA_FORMATS = ("prompt_completion", "chat")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EXTRA = "pip install 'nemo_customizer[eval]'"


def _pairs(predictions: Sequence[Any], references: Sequence[Any]) -> int:
    """The number of examples; raises unless both lists are non-empty and equally long."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    return len(references)


def _mean(score: Callable[[Any, Any], float], predictions: Sequence[Any], references: Sequence[Any]) -> float:
    count = _pairs(predictions, references)
    return sum(score(p, r) for p, r in zip(predictions, references)) / count


def _require(module: str, distribution: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this metric needs {distribution!r}, which is not installed: {_EXTRA}") from exc


# --- text ------------------------------------------------------------------------------------------------------


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share (0..1) of predictions equal to their reference after stripping surrounding whitespace; case counts."""
    return _mean(lambda p, r: float(p.strip() == r.strip()), predictions, references)


def normalize_squad(text: str) -> str:
    """SQuAD v1.1 answer normalization: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse
    whitespace to single spaces (and strip it)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_f1_one(prediction: str, reference: str) -> float:
    pred, ref = normalize_squad(prediction).split(), normalize_squad(reference).split()
    if not pred or not ref:
        # An empty answer is right only when the reference is empty too ("no answer").
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())  # bag of tokens: a repeated token counts min(times) times
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share (0..1) of predictions equal to their reference after ``normalize_squad``."""
    return _mean(lambda p, r: float(normalize_squad(p) == normalize_squad(r)), predictions, references)


def squad_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean (0..1) over examples of token F1 between the ``normalize_squad`` whitespace tokens of prediction and
    reference, overlap counted as a multiset (Counter intersection); both empty → 1.0, exactly one empty → 0.0."""
    return _mean(_squad_f1_one, predictions, references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100) of sacrebleu with its defaults (13a tokenizer, 4-grams, exponential smoothing),
    one reference per prediction."""
    _pairs(predictions, references)
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0..100) of sacrebleu with its defaults (character 6-grams, beta 2), one reference each."""
    _pairs(predictions, references)
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over examples of the ROUGE-L F-measure (longest common subsequence of Porter-stemmed lowercase
    alphanumeric tokens) from ``rouge_score``, times 100 so it reads on BLEU's and chrF's 0..100 scale."""
    _pairs(predictions, references)
    scorer = _require("rouge_score.rouge_scorer", "rouge-score").RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * _mean(lambda p, r: scorer.score(r, p)["rougeL"].fmeasure, predictions, references)


# --- labels ----------------------------------------------------------------------------------------------------


def label_set(references: Sequence[str], max_labels: int = 20) -> tuple[str, ...] | None:
    """The sorted distinct stripped references when they form a small label set, else None.

    A label set has at most ``max_labels`` distinct values, each non-empty, one line and at most 5 words, and
    fewer distinct values than half the rows: free text with few rows would otherwise pass as labels.
    """
    distinct = {reference.strip() for reference in references}
    if not distinct or len(distinct) > max_labels or len(distinct) >= len(references) / 2:
        return None
    if any(not label or "\n" in label or len(label.split()) > 5 for label in distinct):
        return None
    return tuple(sorted(distinct))


def _ends_word(text: str, position: int) -> bool:
    """Whether ``text`` ends at ``position`` or continues there with whitespace or punctuation ("fresh." is
    fresh, "freshly" is not)."""
    if position == len(text):
        return True
    return text[position].isspace() or unicodedata.category(text[position]).startswith("P")


def match_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a generation means, or None.

    The stripped prediction equal to a label ignoring case wins (an exact-case equal label first); else the longest
    label that the case-folded prediction starts with, followed by its end, whitespace or punctuation (a model
    often keeps talking after the label).
    """
    text = prediction.strip()
    folded = text.casefold()
    for label in labels:
        if label == text:
            return label
    for label in labels:
        if label.casefold() == folded:
            return label
    prefixed = [label for label in labels if label and folded.startswith(label.casefold())
                and _ends_word(folded, len(label.casefold()))]
    return max(prefixed, key=len) if prefixed else None


def label_accuracy(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Share (0..1) of predictions whose ``match_label`` is their stripped reference."""
    return _mean(lambda p, r: float(match_label(p, labels) == r.strip()), predictions, references)


# --- tool calls ------------------------------------------------------------------------------------------------


def canonical_call(call: Mapping[str, Any]) -> tuple[str, str]:
    """``(name, arguments)`` of an OpenAI tool call (``{"type": "function", "function": {...}}`` or the bare
    ``{"name", "arguments"}``), the arguments as canonical JSON (sorted keys, no spaces, non-ASCII kept) whether
    given as a JSON string or a dict; a string that is not JSON stays, stripped, so it still matches itself."""
    function = call["function"] if isinstance(call.get("function"), Mapping) else call
    if not isinstance(function.get("name"), str):
        raise ValueError(f"tool call without a string 'name': {call!r}")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}  # OpenAI sends "{}" for a call without arguments; a missing key means the same
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return function["name"], arguments.strip()
    return function["name"], json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tool_call_exact_match(predicted_calls: Sequence[Sequence[Mapping[str, Any]] | None],
                          reference_calls: Sequence[Sequence[Mapping[str, Any]] | None]) -> float:
    """Mean over examples of 1 when the multisets of ``canonical_call`` of the predicted and reference calls are
    equal (order ignored, duplicates counted; no calls on both sides is a correct "no call"), else 0."""
    def one(predicted, reference) -> float:
        return float(Counter(map(canonical_call, predicted or ())) == Counter(map(canonical_call, reference or ())))
    return _mean(one, predicted_calls, reference_calls)


def function_name_accuracy(predicted_calls: Sequence[Sequence[Mapping[str, Any]] | None],
                           reference_calls: Sequence[Sequence[Mapping[str, Any]] | None]) -> float:
    """Mean over examples of 1 when the multisets of called function names are equal (arguments ignored), else 0."""
    def names(calls) -> Counter:
        return Counter(canonical_call(call)[0] for call in calls or ())
    return _mean(lambda p, r: float(names(p) == names(r)), predicted_calls, reference_calls)


# --- registry --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A metric a user can name in ``evaluation.metrics``."""

    name: str
    description: str
    formats: tuple[str, ...]
    """Data formats it applies to: ``"prompt_completion"`` and/or ``"chat"``."""
    source: str
    """``"generation"``: computed here from generated text; ``"scores"``: by the runner from log-probabilities."""
    needs_labels: bool = False
    """Only when the references form a small label set (``label_set``)."""
    needs_tool_calls: bool = False
    """Only when some reference turn has tool calls."""


_BOTH, _PC, _CHAT = DATA_FORMATS, ("prompt_completion",), ("chat",)
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", "share of generations equal to the reference (stripped, case-sensitive)", _BOTH,
           "generation"),
    Metric("accuracy", "share of generations that mean the reference label (match_label)", _PC, "generation",
           needs_labels=True),
    Metric("label_logprob_accuracy", "share of rows whose reference label has the highest log-probability among "
           "the labels (no generation)", _PC, "scores", needs_labels=True),
    Metric("squad_exact_match", "SQuAD exact match after normalization", _PC, "generation"),
    Metric("squad_f1", "SQuAD token F1 after normalization, mean over rows", _PC, "generation"),
    Metric("bleu", "sacrebleu corpus BLEU, 0..100", _PC, "generation"),
    Metric("chrf", "sacrebleu corpus chrF, 0..100", _PC, "generation"),
    Metric("rouge_l", "mean ROUGE-L F-measure, 0..100", _PC, "generation"),
    Metric("tool_call_exact_match", "share of turns whose tool calls equal the reference's (names and arguments)",
           _CHAT, "generation", needs_tool_calls=True),
    Metric("function_name_accuracy", "share of turns calling the same functions as the reference", _CHAT,
           "generation", needs_tool_calls=True),
    Metric("loss", "mean cross-entropy per completion token", _BOTH, "scores"),
    Metric("perplexity", "exp(loss)", _BOTH, "scores"),
)}


def _check_format(data_format: str) -> None:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}")


def default_metrics(data_format: str, *, labels: Sequence[str] | None, has_tool_calls: bool) -> tuple[str, ...]:
    """The metrics evaluated when none are configured, chosen by what the references look like."""
    _check_format(data_format)
    if data_format == "chat":
        tools = ("tool_call_exact_match", "function_name_accuracy") if has_tool_calls else ()
        return ("exact_match", "loss", "perplexity", *tools)
    if labels is not None:
        return ("exact_match", "accuracy", "label_logprob_accuracy", "loss", "perplexity")
    return ("exact_match", "squad_exact_match", "squad_f1", "bleu", "chrf", "rouge_l", "loss", "perplexity")


def check_metrics(names: Sequence[str], data_format: str, *, labels: Sequence[str] | None, has_tool_calls: bool,
                  where: str) -> tuple[str, ...]:
    """``names`` deduplicated in order; ``ValueError`` naming ``where`` for a metric that is unknown or does not
    apply to this data (its format, labels or tool calls)."""
    _check_format(data_format)
    for name in names:
        metric = METRICS.get(name)
        if metric is None:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown metric {name!r}{hint}; known metrics: {', '.join(METRICS)}")
        if data_format not in metric.formats:
            raise ValueError(f"{where}: metric {name!r} applies to {' and '.join(metric.formats)} data, "
                             f"not {data_format}")
        if metric.needs_labels and labels is None:
            raise ValueError(f"{where}: metric {name!r} needs the completions to be a small label set (at most 20 "
                             "short distinct labels, each on several rows), and these completions are not a small "
                             "label set; use exact_match or the free-text metrics (squad_f1, bleu, chrf, rouge_l)")
        if metric.needs_tool_calls and not has_tool_calls:
            raise ValueError(f"{where}: metric {name!r} needs reference turns with tool calls, and none has any")
    return tuple(dict.fromkeys(names))


_TEXT_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match, "squad_exact_match": squad_exact_match, "squad_f1": squad_f1,
    "bleu": bleu, "chrf": chrf, "rouge_l": rouge_l,
}
_CALL_METRICS = {"tool_call_exact_match": tool_call_exact_match, "function_name_accuracy": function_name_accuracy}


def compute_generation_metrics(names: Sequence[str], predictions: Sequence[str], references: Sequence[str], *,
                               labels: Sequence[str] | None = None,
                               predicted_calls: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
                               reference_calls: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
                               ) -> dict[str, float]:
    """``{name: value}`` for every named metric computed from generations; "scores" metrics are the runner's and
    are skipped. Raises ``ValueError`` for empty or unequal lists, an unknown name, or missing labels/calls."""
    count = _pairs(predictions, references)
    results: dict[str, float] = {}
    for name in dict.fromkeys(names):
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
        if METRICS[name].source != "generation":
            continue
        if name in _TEXT_METRICS:
            results[name] = _TEXT_METRICS[name](predictions, references)
        elif name == "accuracy":
            if labels is None:
                raise ValueError("metric 'accuracy' needs labels")
            results[name] = label_accuracy(predictions, references, labels)
        else:
            if predicted_calls is None or reference_calls is None:
                raise ValueError(f"metric {name!r} needs predicted_calls and reference_calls")
            if not len(predicted_calls) == len(reference_calls) == count:
                raise ValueError(f"{count} predictions but {len(predicted_calls)} predicted and "
                                 f"{len(reference_calls)} reference tool-call lists")
            results[name] = _CALL_METRICS[name](predicted_calls, reference_calls)
    return results
