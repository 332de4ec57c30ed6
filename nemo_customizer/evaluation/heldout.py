"""The held-out rows of an evaluation: read and validated like training data, their references, and their tokens.

No model and no megatron here: everything about the data is settled, and every bad row reported, before a model is
loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nemo_customizer.data.errors import DatasetError
from nemo_customizer.data.examples import TokenizedExample
from nemo_customizer.evaluation.metrics import label_set


@dataclass(frozen=True)
class HeldOutSet:
    """Validated held-out rows of one format and what each row's answer should be."""

    path: str
    format: str
    """``prompt_completion`` or ``chat``."""
    examples: list[Any]
    """``PromptCompletion`` or ``Conversation`` rows, in file order."""
    references: list[str]
    """The completion, or the content of the conversation's last (assistant) message."""
    reference_calls: Optional[list[list[dict]]]
    """Chat: the last assistant message's tool calls (``[]`` for none); ``None`` for prompt/completion data."""
    labels: Optional[tuple[str, ...]]
    """The label set, when the completions are a small set of short labels (``metrics.label_set``)."""

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.reference_calls) and any(self.reference_calls)

    def prompt_messages(self, index: int) -> list[dict]:
        """Chat: the conversation before its last assistant message (what the model answers)."""
        return list(self.examples[index].messages[:-1])


def read_heldout(path: str | Path, max_examples: Optional[int] = None) -> HeldOutSet:
    """Every row of the JSONL file ``path`` validated (``DatasetError`` naming file:line), the first
    ``max_examples`` kept."""
    from nemo_customizer.data.loading import load_examples

    fmt, examples = load_examples(path)
    if fmt == "preference":
        raise DatasetError(f"{path}: preference pairs (a prompt with a chosen and a rejected response) have no single "
                           f"reference answer to score generations against. Evaluate on a file of prompt/completion "
                           f"or chat rows (evaluation.dataset=FILE).")
    if max_examples is not None:
        examples = examples[:max_examples]
    if fmt == "chat":
        last = [example.messages[-1] for example in examples]
        references = [message.get("content") or "" for message in last]
        calls: Optional[list[list[dict]]] = [list(message.get("tool_calls") or []) for message in last]
        labels = None
    else:
        references = [example.completion for example in examples]
        calls, labels = None, label_set(references)
    return HeldOutSet(path=str(path), format=fmt, examples=examples, references=references, reference_calls=calls,
                      labels=labels)


def tokenize_heldout(heldout: HeldOutSet, tokenizer, max_length: int) -> list[TokenizedExample]:
    """Each row tokenized exactly as training tokenizes it (loss mask on the completion / assistant turns), at most
    ``max_length`` tokens; a row that cannot fit is a ``DatasetError`` (every row must be scored and answered)."""
    from nemo_customizer.data.tokenization import tokenize_examples

    tokenized, stats = tokenize_examples(heldout.examples, tokenizer, max_length)
    if len(tokenized) != len(heldout.examples):
        origins = ", ".join(stats.dropped_origins[:5])
        raise DatasetError(f"{heldout.path}: {len(heldout.examples) - len(tokenized)} row(s) have no answer token "
                           f"left within the model's {max_length}-token context ({origins}); shorten or remove them.")
    return tokenized


def prompt_ids(example: TokenizedExample) -> list[int]:
    """A prompt/completion row's prompt tokens, as training showed them (left-truncated where it was too long)."""
    first_target = example.loss_mask.index(1)
    return example.input_ids[:first_target]


def label_completions(heldout: HeldOutSet) -> dict[str, str]:
    """Each label's completion text as the data writes it (the first row whose stripped completion is the label),
    so a label is scored with the spacing the model was trained on."""
    written: dict[str, str] = {}
    for reference in heldout.references:
        written.setdefault(reference.strip(), reference)
    return {label: written[label] for label in heldout.labels or ()}
