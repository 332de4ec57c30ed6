"""Chat preference pairs as token ids: the prompt messages followed by each response, rendered with the chat template.

Each sequence is the conversation ``prompt + response`` encoded exactly as chat SFT encodes it (``ChatEncoder``), with
the loss mask kept on the response's assistant turns only (their content, tool calls and end-of-turn token; earlier
assistant turns of the prompt are context, not targets). The tokens before the first response turn are the prompt:
the same in both sequences, or the row is an error.

Over-long pairs lose prompt first as whole turns and then as tokens, from the left: the oldest exchanges after the
system message go first (the template's formatting stays intact), then, when even the last exchange is too long, the
leading tokens of what is left (a BOS token the template writes is kept). A pair whose longer response cannot fit is
dropped.
"""

from __future__ import annotations

from typing import Optional, Sequence

from nemo_customizer.data.chat_masks import ChatEncoder, ChatTemplateError, Message
from nemo_customizer.data.examples import TokenizedExample, TokenizedPair
from nemo_customizer.data.truncation import kept_prompt


def encode_chat_pair(
    encoder: ChatEncoder, prompt: Sequence[Message], chosen: Sequence[Message], rejected: Sequence[Message],
    tools: Optional[Sequence[dict]], max_seq_length: int,
) -> tuple[Optional[TokenizedPair], str]:
    """The pair as ``TokenizedPair`` with each sequence at most ``max_seq_length`` tokens, and what happened to it:
    ``(pair, "unchanged" | "truncated")`` or ``(None, "dropped")``. Raises ``ChatTemplateError`` for a row the
    template cannot render or whose two sequences do not share their prompt tokens."""
    pair, prompt_length = _encode_pair(encoder, prompt, chosen, rejected, tools)
    if _longest(pair) <= max_seq_length:
        return pair, "unchanged"
    shorter = _shorter_prompts(prompt)
    fitting = _longest_fitting(encoder, shorter, chosen, rejected, tools, max_seq_length)
    if fitting is not None:
        pair, _ = _encode_pair(encoder, fitting, chosen, rejected, tools)
        if _longest(pair) <= max_seq_length:
            return pair, "truncated"
    if shorter:
        pair, prompt_length = _encode_pair(encoder, shorter[-1], chosen, rejected, tools)
    return _cut_prompt_tokens(pair, prompt_length, encoder.tokenizer.bos_token_id, max_seq_length)


def _encode_pair(encoder: ChatEncoder, prompt: Sequence[Message], chosen: Sequence[Message],
                 rejected: Sequence[Message], tools: Optional[Sequence[dict]]) -> tuple[TokenizedPair, int]:
    """Both sequences, full length, and the number of prompt tokens they share."""
    chosen_example, chosen_start = _encode_sequence(encoder, prompt, chosen, tools)
    rejected_example, rejected_start = _encode_sequence(encoder, prompt, rejected, tools)
    if chosen_start != rejected_start or chosen_example.input_ids[:chosen_start] != \
            rejected_example.input_ids[:rejected_start]:
        raise ChatTemplateError("the prompt renders to different tokens before the chosen and before the rejected "
                                "response, so the pair has no common prompt")
    return TokenizedPair(chosen=chosen_example, rejected=rejected_example), chosen_start


def _encode_sequence(encoder: ChatEncoder, prompt: Sequence[Message], response: Sequence[Message],
                     tools: Optional[Sequence[dict]]) -> tuple[TokenizedExample, int]:
    """``prompt + response`` with the loss on the response's assistant turns, and where the response starts."""
    encoded = encoder.encode([*prompt, *response], tools)
    prompt_turns = sum(message["role"] == "assistant" for message in prompt)
    mask = list(encoded.loss_mask)
    for start, end in encoded.turns[:prompt_turns]:  # earlier answers of a multi-turn prompt: context only
        mask[start:end] = [0] * (end - start)
    return TokenizedExample(encoded.input_ids, mask), encoded.turns[prompt_turns][0]


def _shorter_prompts(prompt: Sequence[Message]) -> list[list[Message]]:
    """The prompt without its oldest exchanges, longest first: the system message (if any) and the messages from
    each later user message on. Empty for a prompt with one user message."""
    system = list(prompt[:1]) if prompt[0]["role"] == "system" else []
    rest = prompt[len(system):]
    return [system + list(rest[i:]) for i in range(1, len(rest)) if rest[i]["role"] == "user"]


def _longest_fitting(encoder: ChatEncoder, prompts: list[list[Message]], chosen: Sequence[Message],
                     rejected: Sequence[Message], tools: Optional[Sequence[dict]],
                     max_seq_length: int) -> Optional[list[Message]]:
    """The longest of ``prompts`` (longest first) with which both sequences fit, or ``None``.

    Binary search over rendered lengths, which shrink as exchanges are dropped: a few renders per over-long row even
    for conversations of hundreds of turns.
    """
    def fits(prompt: list[Message]) -> bool:
        texts = [encoder.render([*prompt, *response], tools) for response in (chosen, rejected)]
        ids = encoder.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return max(len(i) for i in ids) <= max_seq_length

    low, high = 0, len(prompts)  # the answer is in prompts[low:high], or None when low == len(prompts)
    while low < high:
        middle = (low + high) // 2
        if fits(prompts[middle]):
            high = middle
        else:
            low = middle + 1
    return prompts[low] if low < len(prompts) else None


def _cut_prompt_tokens(pair: TokenizedPair, prompt_length: int, bos_id: Optional[int],
                       max_seq_length: int) -> tuple[Optional[TokenizedPair], str]:
    """The pair with prompt tokens removed from the left (after a leading BOS) until the longer sequence fits."""
    prompt_ids = pair.chosen.input_ids[:prompt_length]
    leading_bos = int(bos_id is not None and prompt_ids[:1] == [bos_id])
    responses = [(e.input_ids[prompt_length:], e.loss_mask[prompt_length:]) for e in (pair.chosen, pair.rejected)]
    kept = kept_prompt(prompt_ids, max(len(ids) for ids, _ in responses), max_seq_length, leading_bos)
    if kept is None:
        return None, "dropped"
    chosen, rejected = (TokenizedExample(kept + ids, [0] * len(kept) + mask) for ids, mask in responses)
    return TokenizedPair(chosen=chosen, rejected=rejected), "truncated"


def _longest(pair: TokenizedPair) -> int:
    return max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
