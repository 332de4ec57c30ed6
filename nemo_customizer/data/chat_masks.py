"""Chat template rendering and assistant-only loss masks derived from the rendered text, without ``{% generation %}``.

For each assistant message ``i`` we render the conversation before it with the generation prompt (``P``, what the model
sees at inference) and the conversation through it (``B``). When ``P`` is a prefix of ``B``, the rest of ``B`` is
exactly what the assistant would generate: its content, tool calls as the template renders them, and the end-of-turn
token(s) (``<|im_end|>``, ``<|eot_id|>``, ``</s>``); role headers, the generation prompt, a default system prompt or a
date header are all in ``P`` and stay untrained. That turn text is then located in the full render, whose tokens
(with character offsets) get the mask. Templates that move text between turns (Mistral v0.3 puts tools and the system
prompt next to the *last* user message) are handled by finding the turn text in the full render; when it cannot be
found, the row is an error instead of a silently wrong mask. Templates that render earlier turns differently once
later ones exist (Qwen3 drops the reasoning of turns before the last user message; Phi-3.5 writes its eos only at the
very end) are handled by reading such a turn from the full render: what follows its prompt, up to and including the
template's end-of-turn token.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from nemo_customizer.data.examples import TokenizedExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]
_SENTINEL = "Zq7Sentinel"  # assistant content to locate in a rendered turn; no whitespace, so `| trim` keeps it


class ChatTemplateError(ValueError):
    """The chat template cannot render this conversation, or its assistant turns cannot be located."""


@dataclass(frozen=True)
class EncodedChat:
    """A rendered, tokenized conversation with one token range per assistant turn."""

    input_ids: list[int]
    loss_mask: list[int]
    turns: list[tuple[int, int]]
    """``[start, end)`` token range of each assistant turn (content, tool calls, end-of-turn token)."""


class ChatEncoder:
    """Renders conversations with ``tokenizer``'s chat template and builds assistant-only loss masks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("chat data needs a fast (Rust) tokenizer: assistant masks map characters to tokens "
                             "with offset mappings")
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; set model.chat_template to the model's Jinja "
                             "chat template (chat data is rendered with it)")
        self.tokenizer = tokenizer
        # Special tokens end assistant turns (<|im_end|>, <|eot_id|>, </s>); truncation keeps them to close a turn.
        specials = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if tokenizer.eos_token_id is not None:
            specials[tokenizer.eos_token_id] = tokenizer.eos_token
        self.special_ids = set(specials)
        self.special_texts = tuple(specials.values())
        self.end_of_turn = end_of_turn_token(tokenizer)

    def encode(self, messages: Sequence[Message], tools: Optional[Sequence[dict]]) -> EncodedChat:
        """Token ids and assistant-only mask of the whole conversation (which ends on an assistant message)."""
        text, spans = self.assistant_char_spans(messages, tools)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        token_starts, token_ends = [a for a, _ in offsets], [b for _, b in offsets]
        mask = [0] * len(ids)
        turns = []
        for i, (start, end) in zip(_assistant_indices(messages), spans):
            # The tokens that overlap the turn's characters; the first may carry template whitespace from before
            # the turn (SentencePiece's "▁Hello" after "[/INST]"), never other template text.
            first = bisect.bisect_right(token_ends, start)  # first token ending after the turn starts
            last = bisect.bisect_left(token_starts, end) - 1  # last token starting before the turn ends
            if first > last:
                raise ChatTemplateError(f"assistant message messages[{i}] renders to no tokens")
            if text[offsets[first][0]:start].strip() or text[end:offsets[last][1]].strip():
                raise ChatTemplateError(
                    f"a token crosses the boundary between template text and assistant message messages[{i}] "
                    f"({text[offsets[first][0]:offsets[first][1]]!r}), so the rendered prompt is not a token prefix "
                    f"of the conversation and the assistant mask would be wrong")
            mask[first:last + 1] = [1] * (last + 1 - first)
            turns.append((first, last + 1))
        return EncodedChat(list(ids), mask, turns)

    def assistant_char_spans(self, messages: Sequence[Message], tools: Optional[Sequence[dict]]
                             ) -> tuple[str, list[tuple[int, int]]]:
        """The full render and the ``[start, end)`` character span of every assistant turn in it."""
        self._check_tool_support(messages, tools)
        full = self.render(messages, tools)
        if tools:
            missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in full]
            if missing:
                raise ChatTemplateError(f"the chat template cannot render tools: tool {missing[0]!r} does not appear "
                                        f"in the rendered conversation")
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i in _assistant_indices(messages):
            through = full if i == len(messages) - 1 else self.render(messages[:i + 1], tools)
            prompt, raw = self._turn_text(messages, i, tools, through)
            turn = self._trim_after_end_of_turn(raw)
            if full.startswith(through) and through.endswith(raw):
                start = len(through) - len(raw)
            elif (later := self._turn_after_prompt(full, prompt)) is not None:
                # rendered differently once later turns exist (Qwen3 drops its reasoning, Phi-3.5 its trailing eos)
                start, turn = len(prompt), later
            else:  # the template moves text between turns (Mistral v0.3): find the turn's text
                start = full.find(raw, cursor)
            if start < cursor:
                raise ChatTemplateError(f"assistant message messages[{i}] is rendered differently inside the full "
                                        f"conversation than on its own, so its tokens cannot be located")
            for call in messages[i].get("tool_calls", ()):
                if call["function"]["name"] not in turn:
                    raise ChatTemplateError(f"the chat template dropped the tool call "
                                            f"{call['function']['name']!r} of messages[{i}]")
            spans.append((start, start + len(turn)))
            cursor = start + len(turn)
        return full, spans

    def render(self, messages: Sequence[Message], tools: Optional[Sequence[dict]], *,
               add_generation_prompt: bool = False) -> str:
        """``tokenizer.apply_chat_template`` as text; template exceptions become ``ChatTemplateError``."""
        try:
            return self.tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2 errors, raise_exception() in templates, TypeError on odd values
            what = "the chat template cannot render tools" if tools else "the chat template failed"
            raise ChatTemplateError(f"{what}: {type(e).__name__}: {e}") from e

    def _turn_text(self, messages: Sequence[Message], i: int, tools: Optional[Sequence[dict]],
                   through: str) -> tuple[Optional[str], str]:
        """The prompt assistant message ``i`` answers (None when ``through`` does not start with it) and what the
        template adds for the message: ``through`` minus that prompt."""
        prompt = self.render(messages[:i], tools, add_generation_prompt=True)
        if through.startswith(prompt) and len(through) > len(prompt):
            return prompt, through[len(prompt):]
        # The template renders the prompt differently when it is the last message (Mistral v0.3 puts the system
        # prompt into the *last* user message): diff against the same conversation with an empty assistant turn.
        empty = self.render([*messages[:i], {"role": "assistant", "content": ""}], tools)
        turn = through[len(os.path.commonprefix([through, empty])):]
        if not turn.strip():
            raise ChatTemplateError(f"cannot find assistant message messages[{i}] in the rendered conversation")
        return None, turn

    def _turn_after_prompt(self, full: str, prompt: Optional[str]) -> Optional[str]:
        """The turn that follows ``prompt`` in the full render, through the template's end-of-turn token; None when
        ``full`` does not start with ``prompt`` or no end-of-turn token follows it."""
        if prompt is None or self.end_of_turn is None or not full.startswith(prompt):
            return None
        end = full.find(self.end_of_turn, len(prompt))
        return None if end < 0 else full[len(prompt):end + len(self.end_of_turn)]

    def _trim_after_end_of_turn(self, turn: str) -> str:
        """Drop what follows the end-of-turn token: never generated, since generation stops at that token (ChatML's
        ``\\n`` after ``<|im_end|>``, Phi-3.5's ``\\n<|endoftext|>`` after ``<|end|>``)."""
        if self.end_of_turn is not None and self.end_of_turn in turn:
            return turn[:turn.rindex(self.end_of_turn) + len(self.end_of_turn)]
        stripped = turn.rstrip()
        return stripped if stripped != turn and stripped.endswith(self.special_texts) else turn

    def _check_tool_support(self, messages: Sequence[Message], tools: Optional[Sequence[dict]]) -> None:
        source = self.tokenizer.get_chat_template(tools=list(tools) if tools else None)
        if tools and not re.search(r"\btools\b", source):
            raise ChatTemplateError("the chat template cannot render tools (it never refers to `tools`)")
        if any(m.get("tool_calls") for m in messages) and not re.search(r"\btool_calls\b", source):
            raise ChatTemplateError("the chat template cannot render tool calls (it never refers to `tool_calls`)")

    def end_of_turn_length(self, ids: Sequence[int]) -> int:
        """How many trailing ``ids`` of an assistant turn are special tokens (its end-of-turn marker)."""
        n = 0
        while n < len(ids) and ids[len(ids) - 1 - n] in self.special_ids:
            n += 1
        return n


def truncate_chat(encoder: ChatEncoder, messages: Sequence[Message], tools: Optional[Sequence[dict]],
                  max_seq_length: int) -> tuple[Optional[TokenizedExample], str]:
    """The conversation as a ``TokenizedExample`` of at most ``max_seq_length`` tokens, and what happened to it.

    Returns ``(example, "unchanged" | "truncated")`` or ``(None, "dropped")``. The rule for chat, keeping the
    template's formatting intact: drop whole trailing turns so the conversation still ends on an assistant message; if
    even the first assistant message does not fit, cut inside it and still close it with its end-of-turn token(s).
    A row that keeps no assistant content token is dropped (it would add nothing but a NaN-prone empty loss).
    """
    encoded = encoder.encode(messages, tools)
    if len(encoded.input_ids) <= max_seq_length:
        return TokenizedExample(encoded.input_ids, encoded.loss_mask), "unchanged"
    assistants = _assistant_indices(messages)
    shorter = [messages[:i + 1] for i in assistants[:-1]]
    if shorter:
        texts = [encoder.render(m, tools) for m in shorter]
        lengths = [len(ids) for ids in encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        fitting = [m for m, n in zip(shorter, lengths) if n <= max_seq_length]
        if fitting:
            kept = encoder.encode(fitting[-1], tools)
            return TokenizedExample(kept.input_ids, kept.loss_mask), "truncated"
        first = encoder.encode(shorter[0], tools)
    else:
        first = encoded
    start, end = first.turns[0]
    closing = encoder.end_of_turn_length(first.input_ids[start:end])
    room = max_seq_length - start - closing
    if room < 1 or end - start - closing < 1:
        return None, "dropped"
    content = first.input_ids[start:end - closing][:room]
    ids = first.input_ids[:start] + content + first.input_ids[end - closing:end]
    return TokenizedExample(ids, [0] * start + [1] * (len(ids) - start)), "truncated"


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> Optional[str]:
    """The added token that closes an assistant turn in the tokenizer's chat template (``<|im_end|>``, ``<|eot_id|>``,
    ``</s>``, ``<|end|>``, ``<end_of_turn>``), or None when the template writes none right after the content.

    Found by rendering a short conversation and reading the token right after the assistant's content.
    """
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # jinja errors, raise_exception() on this probe conversation: no end-of-turn token known
        return None
    if _SENTINEL not in text:
        return None
    after = tokenizer(text[text.rindex(_SENTINEL) + len(_SENTINEL):], add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder
    return added[after[0]].content if after and after[0] in added else None


def _assistant_indices(messages: Sequence[Message]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]
