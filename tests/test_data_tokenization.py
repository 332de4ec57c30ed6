"""Tokenization, completion-only loss masks and the prompt-from-the-left truncation rule, checked by hand on a tiny real
tokenizer."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from nemo_customizer.data import PromptCompletion, TokenizedExample, tokenize_examples
from nemo_customizer.data.truncation import truncate_prompt_left

PAD, BOS, EOS = 0, 1, 2
WORDS = {w: i + 4 for i, w in enumerate("abcdefghij")}  # a=4, b=5, ..., j=13


def tiny_tokenizer(add_bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a..j; adds BOS like Llama's when ``add_bos``. No download needed."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **WORDS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    special = {"bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if eos:
        special["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def ex(prompt: str, completion: str, origin: str = "t.jsonl:1") -> PromptCompletion:
    return PromptCompletion(prompt, completion, origin)


def test_tiny_tokenizer_behaves_like_llama():
    tok = tiny_tokenizer()
    assert tok("a b", add_special_tokens=True)["input_ids"] == [BOS, 4, 5]
    assert tok("a b", add_special_tokens=False)["input_ids"] == [4, 5]


def test_fitting_row_is_bos_prompt_completion_eos_with_completion_only_loss():
    out, stats = tokenize_examples([ex("a b", "c d")], tiny_tokenizer(), max_seq_length=100)
    #                     <s>  a  b  c  d  </s>
    assert out == [TokenizedExample([BOS, 4, 5, 6, 7, EOS], [0, 0, 0, 1, 1, 1])]
    assert (stats.unchanged, stats.truncated, stats.dropped, stats.kept) == (1, 0, 0, 1)


def test_exact_fit_is_not_truncated():
    out, stats = tokenize_examples([ex("a b", "c d")], tiny_tokenizer(), max_seq_length=6)
    assert out[0].input_ids == [BOS, 4, 5, 6, 7, EOS] and stats.unchanged == 1


def test_long_prompt_loses_its_start_but_keeps_bos():
    # prompt: <s> a b c d e (6), completion: f </s> (2); 5 allowed -> <s> + last 2 prompt words + completion.
    out, stats = tokenize_examples([ex("a b c d e", "f")], tiny_tokenizer(), max_seq_length=5)
    assert out == [TokenizedExample([BOS, 7, 8, 9, EOS], [0, 0, 0, 1, 1])]
    assert (stats.unchanged, stats.truncated, stats.dropped) == (0, 1, 0)


def test_whole_prompt_body_removed_when_only_bos_and_completion_fit():
    out, stats = tokenize_examples([ex("a b c", "f g")], tiny_tokenizer(), max_seq_length=4)
    assert out == [TokenizedExample([BOS, 9, 10, EOS], [0, 1, 1, 1])] and stats.truncated == 1


def test_row_whose_completion_and_bos_do_not_fit_is_dropped_in_place():
    rows = [ex("a", "b", "t.jsonl:1"), ex("a", "b c d e", "t.jsonl:2"), ex("c", "d", "t.jsonl:3")]
    out, stats = tokenize_examples(rows, tiny_tokenizer(), max_seq_length=5)
    # Row 2 needs <s> + b c d e </s> = 6 > 5 tokens even with no prompt left.
    assert [e.input_ids for e in out] == [[BOS, 4, 5, EOS], [BOS, 6, 7, EOS]]
    assert (stats.unchanged, stats.truncated, stats.dropped) == (2, 0, 1)
    assert stats.dropped_origins == ["t.jsonl:2"]
    assert stats.describe() == "2 examples kept (0 truncated), 1 dropped"


def test_tokenizer_without_bos_truncates_from_the_very_start():
    out, stats = tokenize_examples([ex("a b c", "d")], tiny_tokenizer(add_bos=False), max_seq_length=3)
    assert out == [TokenizedExample([6, 7, EOS], [0, 1, 1])] and stats.truncated == 1


def test_no_eos_token_is_an_error():
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_examples([ex("a", "b")], tiny_tokenizer(eos=False), max_seq_length=10)


def test_empty_input_and_bad_length():
    out, stats = tokenize_examples([], tiny_tokenizer(), max_seq_length=10)
    assert out == [] and stats.kept == 0
    with pytest.raises(ValueError, match="max_seq_length"):
        tokenize_examples([ex("a", "b")], tiny_tokenizer(), max_seq_length=0)


@pytest.mark.parametrize(
    "max_len, expected_ids",
    [
        (6, [1, 10, 11, 12, 20, 21]),  # fits exactly
        (5, [1, 11, 12, 20, 21]),      # room for two prompt body tokens: the last two
        (4, [1, 12, 20, 21]),          # room for one
        (3, [1, 20, 21]),              # room 0: the body must go entirely (body[-0:] would keep it all)
        (2, None),                     # BOS + completion do not fit
    ],
)
def test_truncate_prompt_left(max_len, expected_ids):
    result = truncate_prompt_left([1, 10, 11, 12], [20, 21], max_len, num_leading_special=1)
    if expected_ids is None:
        assert result is None
    else:
        assert result.input_ids == expected_ids
        assert result.loss_mask == [0] * (len(expected_ids) - 2) + [1, 1]


def test_tokenized_example_checks_lengths():
    with pytest.raises(ValueError):
        TokenizedExample([1, 2], [0])
