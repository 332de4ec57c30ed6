"""Preference rows (a prompt, a chosen and a rejected response) for DPO: validation, parsing, tokenization into pairs.

The three layouts users have (NeMo Customizer's, TRL's, OpenAI's) are one format, detected per file from the response
field names of its first row (``preference_rows``). Each row becomes a ``TokenizedPair``: the prompt followed by the
chosen response, and by the rejected one, the loss on each response only.

- Text prompts are tokenized as prompt/completion rows are: the prompt with the tokenizer's special tokens (its BOS),
  each response without, then EOS. Over-long pairs lose prompt tokens from the left (the BOS is kept).
- Chat prompts are rendered with the chat template, each response's loss mask being what chat SFT trains for those
  assistant turns (``chat_pairs``). Over-long pairs lose the prompt's oldest exchanges, then its leading tokens.

Both sequences of a pair always keep the same prompt tokens. A pair whose longer response (+ BOS) alone exceeds
``max_seq_length`` is dropped and counted: it cannot be trained on without both full responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from nemo_customizer.data.chat_masks import ChatEncoder, ChatTemplateError
from nemo_customizer.data.chat_pairs import encode_chat_pair
from nemo_customizer.data.errors import IssueLog
from nemo_customizer.data.examples import TokenizedPair
from nemo_customizer.data.formats.base import DataFormat, Row
from nemo_customizer.data.formats.chat import TEMPLATE_HINT
from nemo_customizer.data.preference_rows import is_preference_row, parse_preference_row, preference_row_problems
from nemo_customizer.data.truncation import TruncationStats, truncate_pair_prompt_left

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZE_CHUNK = 8192
Message = dict[str, Any]


@dataclass(frozen=True)
class PreferenceExample:
    """One validated preference row: all three parts text, or all chat messages (normalized for chat templates)."""

    prompt: Union[str, tuple[Message, ...]]
    """The text the responses continue, or the conversation they answer (ends with a user message or tool results)."""
    chosen: Union[str, tuple[Message, ...]]
    """The preferred response: text, or assistant messages (with any tool results between them)."""
    rejected: Union[str, tuple[Message, ...]]
    """The other response, in the same form as ``chosen``."""
    tools: Optional[tuple[dict[str, Any], ...]]
    """``{"type": "function", "function": {...}}`` tool schemas of a chat row, or ``None``."""
    origin: str
    """``path:line`` the row came from."""

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def build_example(row: Row, origin: str) -> PreferenceExample:
    parts, problems = parse_preference_row(row)
    if parts is None:  # loading checks row_problems first
        raise ValueError(f"{origin}: not a valid preference row: {problems}")
    return PreferenceExample(prompt=parts.prompt, chosen=parts.chosen, rejected=parts.rejected, tools=parts.tools,
                             origin=origin)


def tokenize(
    examples: Sequence[PreferenceExample], tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> tuple[list[TokenizedPair], TruncationStats]:
    """One ``TokenizedPair`` per kept row, in row order; each sequence at most ``max_seq_length`` tokens.

    ``pair.chosen`` / ``pair.rejected`` are ``prompt + response`` with ``loss_mask`` 1 on the response's trained
    tokens only (text: the response and its EOS; chat: the response's assistant turns with their end-of-turn token).
    Both start with the same prompt tokens. Rows the chat template cannot render are collected and raised as one
    ``DatasetError`` naming each row's file:line; the stats count unchanged, truncated and dropped pairs.
    """
    text_ids = _text_token_ids([e for e in examples if not e.is_chat], tokenizer)
    encoder = ChatEncoder(tokenizer) if any(e.is_chat for e in examples) else None
    bos = tokenizer.bos_token_id
    issues = IssueLog()
    stats = TruncationStats(unit="pairs")
    pairs = []
    for example in examples:
        if example.is_chat:
            try:
                pair, outcome = encode_chat_pair(encoder, example.prompt, example.chosen, example.rejected,
                                                 example.tools, max_seq_length)
            except ChatTemplateError as e:
                issues.add(example.origin, str(e), TEMPLATE_HINT)
                continue
        else:
            prompt_ids, chosen_ids, rejected_ids = next(text_ids)
            leading_bos = int(bos is not None and prompt_ids[:1] == [bos])
            pair = truncate_pair_prompt_left(prompt_ids, chosen_ids, rejected_ids, max_seq_length, leading_bos)
            full = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
            outcome = "dropped" if pair is None else "unchanged" if full <= max_seq_length else "truncated"
        _count(stats, outcome, example.origin)
        if pair is not None:
            pairs.append(pair)
    issues.raise_if_any()
    return pairs, stats


def _count(stats: TruncationStats, outcome: str, origin: str) -> None:
    if outcome == "dropped":
        stats.dropped += 1
        stats.dropped_origins.append(origin)
    elif outcome == "truncated":
        stats.truncated += 1
    else:
        stats.unchanged += 1


def _text_token_ids(examples: Sequence[PreferenceExample], tokenizer: PreTrainedTokenizerBase
                    ) -> Iterator[tuple[list[int], list[int], list[int]]]:
    """``(prompt ids with special tokens, chosen ids + EOS, rejected ids + EOS)`` per text example, in order.

    Batched in chunks of ``TOKENIZE_CHUNK`` rows, as prompt/completion rows are (fast tokenizers work on many rows at
    once; the chunks bound the memory of their output).
    """
    eos = tokenizer.eos_token_id
    if examples and eos is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS so the model learns to stop")
    for start in range(0, len(examples), TOKENIZE_CHUNK):
        chunk = examples[start:start + TOKENIZE_CHUNK]
        prompts = tokenizer([e.prompt for e in chunk], add_special_tokens=True, return_attention_mask=False)
        chosen = tokenizer([e.chosen for e in chunk], add_special_tokens=False, return_attention_mask=False)
        rejected = tokenizer([e.rejected for e in chunk], add_special_tokens=False, return_attention_mask=False)
        for prompt_ids, chosen_ids, rejected_ids in zip(prompts["input_ids"], chosen["input_ids"],
                                                        rejected["input_ids"]):
            yield prompt_ids, chosen_ids + [eos], rejected_ids + [eos]


PREFERENCE = DataFormat(
    name="preference",
    matches=is_preference_row,
    row_hint=('Each line must be a JSON object with a prompt and two responses: {"prompt": ..., "chosen_response": '
              '..., "rejected_response": ...}, TRL\'s {"prompt": ..., "chosen": ..., "rejected": ...} or OpenAI\'s '
              '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}; a prompt is '
              'a string or a list of chat messages ending with a user message, a response a string or a list of '
              'assistant messages.'),
    example_type=PreferenceExample,
    row_problems=preference_row_problems,
    build_example=build_example,
    tokenize=tokenize,
)
