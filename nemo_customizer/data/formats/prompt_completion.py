"""Prompt/completion rows ``{"prompt": str, "completion": str}``: validation, parsing, tokenization.

The loss is on completion tokens only (the model learns to answer, not to reproduce prompts), and over-long rows lose
prompt tokens from the left (see ``truncation.truncate_prompt_left``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from nemo_customizer.data.examples import TokenizedExample
from nemo_customizer.data.formats.base import DataFormat, Row
from nemo_customizer.data.jsonl import json_type_name, shown_keys, shown_value
from nemo_customizer.data.truncation import TruncationStats, truncate_prompt_left

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIELDS = ("prompt", "completion")
TOKENIZE_CHUNK = 8192


@dataclass(frozen=True)
class PromptCompletion:
    """One validated prompt/completion row."""

    prompt: str
    completion: str
    origin: str
    """``path:line`` the row came from (for messages about dropped or odd rows)."""


def row_problems(row: Row) -> list[str]:
    """Every problem with the two required fields of ``row``; other keys are ignored."""
    problems = []
    for name in FIELDS:
        if name not in row:
            problems.append(f'field "{name}" is missing (keys found: {shown_keys(row)})')
        elif not isinstance(row[name], str):
            value = row[name]
            problems.append(f'field "{name}" must be a string, got {json_type_name(value)} '
                            f'(value {shown_value(value)})')
        elif not row[name].strip():
            problems.append(f'field "{name}" is empty')
    return problems


def build_example(row: Row, origin: str) -> PromptCompletion:
    return PromptCompletion(prompt=row["prompt"], completion=row["completion"], origin=origin)


def tokenize(
    examples: Sequence[PromptCompletion], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> tuple[list[TokenizedExample], TruncationStats]:
    """Tokenize rows as ``prompt (with special tokens) + completion + EOS``, loss on the completion and EOS.

    The prompt is tokenized with ``add_special_tokens=True`` so the model sees the BOS it was trained with; the
    completion without, then EOS is appended so the model learns to stop. Rows longer than ``max_seq_length`` are
    truncated or dropped by ``truncation.truncate_prompt_left``; the stats say how many.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; completions must end with EOS so the model learns to stop")
    bos = tokenizer.bos_token_id
    stats = TruncationStats()
    tokenized = []
    for example, prompt_ids, completion_ids in _token_ids(examples, tokenizer):
        completion_ids = completion_ids + [eos]
        leading_bos = int(bos is not None and prompt_ids[:1] == [bos])
        result = truncate_prompt_left(prompt_ids, completion_ids, max_seq_length, num_leading_special=leading_bos)
        if result is None:
            stats.dropped += 1
            stats.dropped_origins.append(example.origin)
            continue
        if len(result.input_ids) < len(prompt_ids) + len(completion_ids):
            stats.truncated += 1
        else:
            stats.unchanged += 1
        tokenized.append(result)
    return tokenized, stats


def _token_ids(examples: Sequence[PromptCompletion], tokenizer: PreTrainedTokenizerBase
               ) -> Iterator[tuple[PromptCompletion, list[int], list[int]]]:
    """``(example, prompt ids with special tokens, completion ids)`` per example.

    Batched calls let a fast tokenizer work on many rows at once; chunks of ``TOKENIZE_CHUNK`` rows bound the memory
    of the tokenizer's intermediate output (a million rows at once held gigabytes of it).
    """
    for start in range(0, len(examples), TOKENIZE_CHUNK):
        chunk = examples[start:start + TOKENIZE_CHUNK]
        prompts = tokenizer([e.prompt for e in chunk], add_special_tokens=True, return_attention_mask=False)
        completions = tokenizer([e.completion for e in chunk], add_special_tokens=False, return_attention_mask=False)
        yield from zip(chunk, prompts["input_ids"], completions["input_ids"])


PROMPT_COMPLETION = DataFormat(
    name="prompt_completion",
    matches=lambda row: True,  # the fallback: rows in no other format get prompt/completion's field errors
    row_hint='Each line must be a JSON object {"prompt": str, "completion": str}.',
    example_type=PromptCompletion,
    row_problems=row_problems,
    build_example=build_example,
    tokenize=tokenize,
)
