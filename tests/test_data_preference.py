"""Preference data (DPO): the three row layouts, each malformed row's file:line error, tokenization into pairs (text
and chat), masks equal to chat SFT's, truncation from the left and dropped pairs.

Chat rows use SmolLM2's own tokenizer and ChatML template, and Llama 3.1's official template (tools) on SmolLM2's BPE
with Llama's special tokens, as tests/test_data_chat_templates.py does. Exact truncation numbers use a word-level
tokenizer that adds a BOS like Llama's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from nemo_customizer.data import DatasetError, TokenizedExample, load_dataset, tokenize_examples
from nemo_customizer.data.examples import TokenizedPair
from nemo_customizer.data.formats import Conversation, PreferenceExample, PromptCompletion, format_of_examples
from nemo_customizer.data.loading import load_examples

TEMPLATES = Path(__file__).parent / "data" / "chat"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BOS, EOS = 1, 2
WORDS = {w: i + 4 for i, w in enumerate("abcdefghij")}  # a=4, b=5, ..., j=13


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint

    return AutoTokenizer.from_pretrained(str(resolve_embedded_checkpoint("smollm2-135m-instruct", None)))


@pytest.fixture(scope="module")
def smol():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def llama31():
    tok = smollm2_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]})
    tok.chat_template = (TEMPLATES / "llama3_1_instruct.jinja").read_text()
    return tok


@pytest.fixture(scope="module")
def words():
    """Whitespace word-level tokenizer over a..j that adds BOS like Llama's; no chat template."""
    vocab = {"<pad>": 0, "<s>": BOS, "</s>": EOS, "<unk>": 3, **WORDS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write(path: Path, *rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path) -> list[PreferenceExample]:
    splits = load_dataset(path, val_fraction=0.0)
    assert splits.format == "preference"
    return splits.train


def load_error(path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(path, val_fraction=0.0)
    return str(info.value)


def trained(tok, example: TokenizedExample) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, run = [], []
    for token, m in zip(example.input_ids + [None], example.loss_mask + [0]):
        if m:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def prompt_length(example: TokenizedExample) -> int:
    return example.loss_mask.index(1)


def pair(examples, tok, max_seq_length=4096) -> TokenizedPair:
    out, stats = tokenize_examples(examples, tok, max_seq_length)
    assert len(out) == 1, stats.describe()
    return out[0]


# --- the layouts ---------------------------------------------------------------------------------------------------

PROMPT = [system("Answer in one sentence."), user("What is the capital of France?")]
CHOSEN, REJECTED = "Paris is the capital of France.", "I think it is Lyon."


def test_the_same_chat_pair_in_every_layout_parses_to_the_same_example(tmp_path):
    f = write(tmp_path / "train.jsonl",
              {"prompt": PROMPT, "chosen_response": CHOSEN, "rejected_response": REJECTED},  # NeMo Customizer
              {"prompt": PROMPT, "chosen": [assistant(CHOSEN)], "rejected": [assistant(REJECTED)]},  # TRL
              {"chosen": [*PROMPT, assistant(CHOSEN)], "rejected": [*PROMPT, assistant(REJECTED)]},  # TRL, implicit
              {"input": {"messages": PROMPT}, "preferred_output": [assistant(CHOSEN)],  # OpenAI
               "non_preferred_output": [assistant(REJECTED)]})
    examples = load(f)
    assert [e.origin for e in examples] == [f"{f}:{i}" for i in range(1, 5)]
    expected = PreferenceExample(prompt=tuple(PROMPT), chosen=(assistant(CHOSEN),), rejected=(assistant(REJECTED),),
                                 tools=None, origin="")
    for example in examples:
        assert example.is_chat and example == dataclasses.replace(expected, origin=example.origin)


def test_text_pairs_in_both_text_layouts(tmp_path):
    f = write(tmp_path / "train.jsonl",
              {"prompt": "Translate: chat", "chosen_response": "cat", "rejected_response": "dog", "id": 7},
              {"prompt": "Résumé en 中文?", "chosen": "简历 ✓", "rejected": "no"})
    first, second = load(f)
    assert (first.prompt, first.chosen, first.rejected, first.tools, first.is_chat) == \
           ("Translate: chat", "cat", "dog", None, False)
    assert (second.prompt, second.chosen, second.rejected) == ("Résumé en 中文?", "简历 ✓", "no")


def test_openai_rows_with_tools_are_normalized_like_chat_rows(tmp_path):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    f = write(tmp_path / "train.jsonl", {
        "input": {"messages": [user("Weather in Paris?")], "tools": [WEATHER_TOOL], "parallel_tool_calls": False},
        "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]}],
        "non_preferred_output": [assistant("I cannot know that.")]})
    (example,) = load(f)
    assert example.tools == (WEATHER_TOOL,)
    # As for chat rows: a JSON-string argument becomes the object templates serialize, a null content is removed.
    assert example.chosen == ({"role": "assistant", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},)


# --- malformed rows ------------------------------------------------------------------------------------------------

def call_message(name):
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]}


VALID = {"prompt": "q", "chosen": "a", "rejected": "b"}
MALFORMED = [  # (row on line 2 after a valid preference row, the problem as the message states it)
    ({"prompt": "q", "chosen_response": "a"},
     'field "rejected_response" is missing (keys found: "prompt", "chosen_response")'),
    ({"prompt": "q", "chosen_response": 3, "rejected_response": "b"},
     'field "chosen_response" must be a string or a list of messages, got int (value 3)'),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, 'field "chosen" is empty'),
    ({"prompt": "q", "chosen": "a", "rejected": []}, 'field "rejected" is empty'),
    ({"prompt": {"text": "q"}, "chosen": "a", "rejected": "b"},
     'field "prompt" must be a string or a list of chat messages, got object'),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, 'field "prompt" is empty'),
    ({"chosen_response": "a", "rejected_response": "b"},
     'field "prompt" is missing (keys found: "chosen_response", "rejected_response")'),
    ({"chosen": "a", "rejected": "b"}, 'field "prompt" is missing (keys found: "chosen", "rejected"); without it, '
                                       '"chosen" and "rejected" must be conversations that begin with the same '
                                       'prompt messages'),
    ({"prompt": "q"}, 'the responses are missing: the row has none of the fields "chosen_response"/'
                      '"rejected_response", "chosen"/"rejected", "preferred_output"/"non_preferred_output" '
                      '(keys found: "prompt")'),
    ({"prompt": "q", "chosen": "a", "rejected_response": "b"},
     'row mixes the response fields of the NeMo Customizer and TRL layouts ("rejected_response", "chosen")'),
    ({"prompt": "q", "chosen": "same", "rejected": "same"},
     'fields "chosen" and "rejected" are the same, so the pair prefers neither'),
    ({"prompt": "q", "chosen": [assistant("a")], "rejected": "b"},
     'field "prompt" is text but field "chosen" is a list of messages'),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "tools": [WEATHER_TOOL]},
     'field "tools" needs a chat prompt (a list of messages)'),
    ({"prompt": [user("q")], "chosen": [user("a")], "rejected": "b"},
     'field "chosen[0].role" is "user" but a response holds only assistant messages (and tool results between '
     'them)'),
    ({"prompt": [user("q"), assistant("x")], "chosen": "a", "rejected": "b"},
     'field "prompt[1].role" is "assistant" but a prompt ends with a user message (or tool results)'),
    ({"prompt": [assistant("x"), user("q")], "chosen": "a", "rejected": "b"},
     'field "prompt[0].role" is "assistant" but the conversation must start with a user message'),
    ({"prompt": [user("q")], "chosen": "a", "rejected": [{"role": "assistant", "content": 5}]},
     'field "rejected[0].content" must be a string, got int'),
    ({"prompt": [user("q")], "chosen": [assistant("a"), {"role": "tool", "content": "x"}], "rejected": "b"},
     'field "chosen[1].role" is "tool" but it does not follow an assistant message with tool_calls'),
    ({"prompt": [user("q")], "chosen": [call_message("get_weather"), {"role": "tool", "content": "18C"}],
      "rejected": "b", "tools": [WEATHER_TOOL]},
     'field "chosen[1].role" is "tool" but a response ends with an assistant message'),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("r"), assistant("b")]},
     'fields "chosen" and "rejected" have no prompt'),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a"), user("more"), assistant("b")]},
     'field "chosen" has no messages after the 2 it begins with in common with "rejected" (the prompt)'),
    ({"chosen": [system("s"), user("q"), assistant("a")], "rejected": [system("s"), user("r"), assistant("a")]},
     'fields "chosen" and "rejected" differ from message 1 on, where "chosen[1]" is a user message: the messages '
     'they begin with in common are the prompt, so each must go on with an assistant message'),
    ({"chosen": [user(""), assistant("a")], "rejected": [user(""), assistant("b")]},
     'field "chosen[0].content" is empty'),  # the implicit prompt's messages are named where they are
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), {"role": "robot", "content": "b"}]},
     'field "rejected[1].role" must be one of'),
    ({"input": [user("q")], "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
     'field "input" must be an object {"messages": [...]}, got list'),
    ({"input": {"prompt": "q"}, "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
     'field "input.messages" is missing (keys found: "prompt")'),
    ({"input": {"messages": []}, "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
     'field "input.messages" is empty'),
    ({"input": {"messages": [user("q")], "tools": {"name": "x"}}, "preferred_output": [assistant("a")],
      "non_preferred_output": [assistant("b")]}, 'field "input.tools" must be a list of tool objects, got object'),
    ({"input": {"messages": [user("q")], "tools": [WEATHER_TOOL]}, "preferred_output": [call_message("get_time")],
      "non_preferred_output": [assistant("b")]},
     'field "preferred_output[0].tool_calls[0].function.name" is "get_time", which is not one of the row\'s tools '
     '("get_weather")'),
    ({"input": {"messages": [user("q")]}, "preferred_output": "a"},
     'field "non_preferred_output" is missing (keys found: "input", "preferred_output")'),
]


@pytest.mark.parametrize("row, problem", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_row_names_file_line_field_and_what_to_do(tmp_path, row, problem):
    f = write(tmp_path / "train.jsonl", VALID, row)
    message = load_error(f)
    assert f"{f}:2: {problem}" in message, message
    assert "a response a string or a list of assistant messages." in message  # the format's hint


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    f = write(tmp_path / "train.jsonl", VALID, {"prompt": "q", "chosen": 1, "rejected": None}, VALID,
              {"prompt": [user("q")], "chosen": [user("a")], "rejected": [assistant("")]})
    lines = load_error(f).splitlines()
    assert lines[:5] == [
        "4 problems in the dataset:",
        f'  {f}:2: field "chosen" must be a string or a list of messages, got int (value 1).',
        f'  {f}:2: field "rejected" must be a string or a list of messages, got null (value null).',
        f'  {f}:4: field "chosen[0].role" is "user" but a response holds only assistant messages (and tool results '
        f'between them).',
        f'  {f}:4: field "rejected[0].content" is empty.',
    ]


@pytest.mark.parametrize("first, second, problem, hint", [
    (VALID, {"prompt": "q", "completion": "a"},
     "row is prompt/completion data (keys found: \"prompt\", \"completion\") but this file's first row is "
     "preference data", "a response a string or a list of assistant messages."),
    (VALID, {"messages": [user("q"), assistant("a")]}, "row is chat data but this file's first row is preference data",
     "Keep one format per file: put chat rows and preference pairs in separate datasets."),
    ({"prompt": "q", "completion": "a"}, VALID,
     "row is preference data but this file's first row is prompt_completion data",
     "Keep one format per file: put preference pairs and prompt/completion rows in separate datasets."),
    ({"messages": [user("q"), assistant("a")]}, {"input": {"messages": [user("q")]}, "preferred_output": "a",
                                                 "non_preferred_output": "b"},
     "row is preference data but this file's first row is chat data",
     "Keep one format per file: put preference pairs and chat rows in separate datasets."),
])
def test_a_file_mixing_formats_is_an_error(tmp_path, first, second, problem, hint):
    f = write(tmp_path / "train.jsonl", first, second)
    message = load_error(f)
    assert message.startswith(f"{f}:2: {problem}") and message.endswith(hint), message


def test_a_dataset_mixing_formats_is_an_error(tmp_path):
    write(tmp_path / "d" / "train.jsonl", VALID)
    write(tmp_path / "d" / "validation.jsonl", {"messages": [user("q"), assistant("a")]})
    assert "validation data is chat but training data is preference" in load_error(tmp_path / "d")
    with pytest.raises(ValueError, match="expected examples of one dataset format"):
        format_of_examples([PreferenceExample("q", "a", "b", None, "t:1"), PromptCompletion("q", "a", "t:2")])


def test_validation_files_and_held_out_split_of_preference_data(tmp_path):
    write(tmp_path / "d" / "train.jsonl", *[{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    splits = load_dataset(tmp_path / "d", val_fraction=0.2, seed=1)
    assert splits.format == "preference" and (len(splits.train), len(splits.val)) == (8, 2)
    assert all(isinstance(e, PreferenceExample) for e in splits.train + splits.val)
    fmt, examples = load_examples(tmp_path / "d" / "train.jsonl")
    assert fmt == "preference" and [e.prompt for e in examples] == [f"q{i}" for i in range(10)]


def test_held_out_evaluation_refuses_preference_pairs_clearly(tmp_path):
    from nemo_customizer.evaluation.heldout import read_heldout

    f = write(tmp_path / "test.jsonl", VALID)
    with pytest.raises(DatasetError, match=re.escape(f"{f}: preference pairs (a prompt with a chosen and a rejected "
                                                     f"response) have no single reference answer")):
        read_heldout(f)


# --- text pairs ----------------------------------------------------------------------------------------------------

def text_pair(prompt, chosen, rejected, origin="t.jsonl:1"):
    return PreferenceExample(prompt, chosen, rejected, None, origin)


def test_text_pair_is_bos_prompt_then_each_response_and_eos(words):
    # A tokenizer without a chat template: text pairs never need one.
    (out,), stats = tokenize_examples([text_pair("a b c", "d", "e f")], words, 100)
    assert out.chosen == TokenizedExample([BOS, 4, 5, 6, 7, EOS], [0, 0, 0, 0, 1, 1])
    assert out.rejected == TokenizedExample([BOS, 4, 5, 6, 8, 9, EOS], [0, 0, 0, 0, 1, 1, 1])
    assert (stats.unchanged, stats.truncated, stats.dropped) == (1, 0, 0)
    assert out.length == 13


@pytest.mark.parametrize("max_seq_length, prompt, outcome", [
    (7, [BOS, 4, 5, 6], "unchanged"),  # the longer sequence fits exactly
    (6, [BOS, 5, 6], "truncated"),     # the prompt loses tokens from the left, BOS kept
    (4, [BOS], "truncated"),           # the whole prompt body goes: BOS + the longer response fit exactly
    (3, None, "dropped"),              # the longer response (e f EOS) + BOS does not fit
])
def test_over_long_text_pair_loses_the_same_prompt_tokens_in_both_sequences(words, max_seq_length, prompt, outcome):
    out, stats = tokenize_examples([text_pair("a b c", "d", "e f", "t.jsonl:9")], words, max_seq_length)
    assert (stats.unchanged, stats.truncated, stats.dropped) == (
        int(outcome == "unchanged"), int(outcome == "truncated"), int(outcome == "dropped"))
    if prompt is None:
        assert out == [] and stats.dropped_origins == ["t.jsonl:9"]
        return
    (result,) = out
    assert result.chosen == TokenizedExample(prompt + [7, EOS], [0] * len(prompt) + [1, 1])
    assert result.rejected == TokenizedExample(prompt + [8, 9, EOS], [0] * len(prompt) + [1, 1, 1])


def test_dropped_pairs_keep_the_order_of_the_others(words):
    rows = [text_pair("a", "b", "c", "t:1"), text_pair("a", "b c d e f", "g", "t:2"), text_pair("b", "c", "d", "t:3")]
    out, stats = tokenize_examples(rows, words, 5)
    assert [p.chosen.input_ids for p in out] == [[BOS, 4, 5, EOS], [BOS, 5, 6, EOS]]
    assert stats.dropped_origins == ["t:2"] and stats.describe() == "2 pairs kept (0 truncated), 1 dropped"


def test_unicode_text_pair_round_trips_with_smollm2(smol):
    out = pair([text_pair("Ça va? 你好 ", "Très bien 👍", "Non.")], smol)
    assert smol.decode(out.chosen.input_ids) == "Ça va? 你好 Très bien 👍<|im_end|>"
    assert trained(smol, out.rejected) == ["Non.<|im_end|>"]
    assert out.chosen.input_ids[:prompt_length(out.chosen)] == out.rejected.input_ids[:prompt_length(out.rejected)]


# --- chat pairs ----------------------------------------------------------------------------------------------------

MULTI_TURN = (system("You answer geography questions."), user("Capital of Italy?"), assistant("Rome."),
              user("And of France?"))


def chat_pair(prompt, chosen, rejected, tools=None, origin="t.jsonl:1"):
    as_messages = (lambda r: (assistant(r),) if isinstance(r, str) else tuple(r))
    return PreferenceExample(tuple(prompt), as_messages(chosen), as_messages(rejected),
                             tuple(tools) if tools else None, origin)


def test_chat_pair_masks_are_chat_sft_masks_of_the_responses(smol):
    out = pair([chat_pair(MULTI_TURN, "Paris.", "Lyon, I believe.")], smol)
    for sequence, response in ((out.chosen, "Paris."), (out.rejected, "Lyon, I believe.")):
        (sft,), _ = tokenize_examples([Conversation((*MULTI_TURN, assistant(response)), None, "t:1")], smol, 4096)
        start = prompt_length(sequence)
        # The same tokens as chat SFT of the whole conversation; the same mask on the response, none on the answers
        # inside the prompt (they are context).
        assert sequence.input_ids == sft.input_ids
        assert sequence.loss_mask == [0] * start + sft.loss_mask[start:]
        assert trained(smol, sft) == ["Rome.<|im_end|>", f"{response}<|im_end|>"]
        assert trained(smol, sequence) == [f"{response}<|im_end|>"]
    assert smol.decode(out.chosen.input_ids[:prompt_length(out.chosen)]) == (
        "<|im_start|>system\nYou answer geography questions.<|im_end|>\n<|im_start|>user\nCapital of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome.<|im_end|>\n<|im_start|>user\nAnd of France?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_length(out.chosen) == prompt_length(out.rejected)
    assert out.chosen.input_ids[:prompt_length(out.chosen)] == out.rejected.input_ids[:prompt_length(out.rejected)]


def test_tool_calls_and_results_in_a_response_with_llama31(tmp_path, llama31):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    f = write(tmp_path / "train.jsonl", {
        "input": {"messages": [system("Be brief."), user("Weather in Paris?")], "tools": [WEATHER_TOOL]},
        "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                             assistant("It is 18°C in Paris.")],
        "non_preferred_output": [assistant("I cannot check the weather.")]})
    out = pair(load(f), llama31)
    # Both assistant turns of the chosen response are trained (the call as the template renders it); the tool result
    # between them is not.
    assert trained(llama31, out.chosen) == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                            "It is 18°C in Paris.<|eot_id|>"]
    assert trained(llama31, out.rejected) == ["I cannot check the weather.<|eot_id|>"]
    prompt = llama31.decode(out.chosen.input_ids[:prompt_length(out.chosen)])
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18C"<|eot_id|>' in llama31.decode(out.chosen.input_ids)


def test_template_that_cannot_render_a_row_names_its_line(tmp_path, smol):
    f = write(tmp_path / "train.jsonl", VALID | {"prompt": [user("q")]},
              {"input": {"messages": [user("Weather?")], "tools": [WEATHER_TOOL]}, "preferred_output": "Sunny.",
               "non_preferred_output": "Rainy."})
    with pytest.raises(DatasetError) as info:
        tokenize_examples(load(f), smol, 4096)
    message = str(info.value)
    assert message.startswith(f"{f}:2: the chat template cannot render tools (it never refers to `tools`).")
    assert "set model.chat_template" in message


LONG_HISTORY = (system("Answer briefly."), user("Tell me about rivers. " * 20), assistant("Rivers flow. " * 20),
                user("Capital of France?"))


def test_over_long_chat_prompt_loses_its_oldest_exchanges_but_keeps_the_system_message(smol):
    example = chat_pair(LONG_HISTORY, "Paris.", "It is London, I think.")
    short = pair([chat_pair((LONG_HISTORY[0], LONG_HISTORY[3]), "Paris.", "It is London, I think.")], smol)
    full = pair([example], smol)
    for max_seq_length in (len(short.rejected.input_ids), len(full.rejected.input_ids) - 1):
        out, stats = tokenize_examples([example], smol, max_seq_length)
        assert out == [short] and (stats.unchanged, stats.truncated, stats.dropped) == (0, 1, 0)
    assert smol.decode(short.chosen.input_ids).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                                                          "<|im_start|>user\nCapital of France?")
    out, stats = tokenize_examples([example], smol, len(full.rejected.input_ids))
    assert out == [full] and stats.unchanged == 1


def test_chat_prompt_still_too_long_loses_tokens_from_the_left(smol):
    example = chat_pair(LONG_HISTORY, "Paris.", "It is London, I think.")
    short = pair([chat_pair((LONG_HISTORY[0], LONG_HISTORY[3]), "Paris.", "It is London, I think.")], smol)
    max_seq_length = len(short.rejected.input_ids) - 3
    (out,), stats = tokenize_examples([example], smol, max_seq_length)
    assert stats.truncated == 1
    start = prompt_length(short.rejected)
    kept = max_seq_length - 1 - (len(short.rejected.input_ids) - start)  # prompt tokens after the leading BOS
    prompt = [smol.bos_token_id] + short.rejected.input_ids[start - kept:start]
    assert short.rejected.input_ids[0] == smol.bos_token_id  # ChatML's <|im_start|> is SmolLM2's BOS
    assert out.rejected == TokenizedExample(prompt + short.rejected.input_ids[start:],
                                            [0] * len(prompt) + short.rejected.loss_mask[start:])
    assert out.chosen == TokenizedExample(prompt + short.chosen.input_ids[start:],
                                          [0] * len(prompt) + short.chosen.loss_mask[start:])
    assert len(out.rejected.input_ids) == max_seq_length


def test_chat_pair_whose_longer_response_cannot_fit_is_dropped(smol):
    rows = [chat_pair([user("Hi")], "Hello!", "Hey. " * 40, origin="d.jsonl:3"), chat_pair([user("Hi")], "a", "b")]
    out, stats = tokenize_examples(rows, smol, 48)
    assert len(out) == 1 and stats.dropped_origins == ["d.jsonl:3"]
    assert all(len(s.input_ids) <= 48 for p in out for s in (p.chosen, p.rejected))


def test_mixed_text_and_chat_rows_of_one_file_keep_their_order(tmp_path, smol):
    f = write(tmp_path / "train.jsonl", {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
              {"prompt": [user("Say hi.")], "chosen": "Hi!", "rejected": "No."})
    text, chat = tokenize_examples(load(f), smol, 4096)[0]
    assert smol.decode(text.chosen.input_ids) == "Say hi.Hi!<|im_end|>"
    assert smol.decode(chat.chosen.input_ids).endswith("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
                                                       "Hi!<|im_end|>\n")


# --- generated rows ------------------------------------------------------------------------------------------------

turn_text = st.text(st.characters(codec="utf-8", exclude_characters="<>|"), min_size=1, max_size=30).filter(str.strip)
junk = st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2) | st.just({})


@st.composite
def chat_prompts(draw):
    """A system message (maybe), then user turns, each but the last answered by the assistant."""
    out = [system(draw(turn_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        out += [user(draw(turn_text)), assistant(draw(turn_text))]
    return out + [user(draw(turn_text))]


@st.composite
def responses(draw, chat: bool):
    if not chat or draw(st.booleans()):
        return draw(turn_text)
    if draw(st.booleans()):
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": json.dumps({"city": draw(turn_text)})}}
        return [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": draw(turn_text)}, assistant(draw(turn_text))]
    return [assistant(draw(turn_text))]


@st.composite
def preference_rows(draw):
    """Rows of every layout, mostly valid; some with one field replaced by a wrong value."""
    chat = draw(st.booleans())
    prompt = draw(chat_prompts()) if chat else draw(turn_text)
    chosen, rejected = draw(responses(chat)), draw(responses(chat))
    tools = [WEATHER_TOOL] if chat else None
    layout = draw(st.sampled_from(["nemo", "trl", "openai"] if chat else ["nemo", "trl"]))
    if layout == "openai":
        as_list = (lambda r: [assistant(r)] if isinstance(r, str) else r)
        row = {"input": {"messages": prompt, "tools": tools}, "preferred_output": as_list(chosen),
               "non_preferred_output": as_list(rejected)}
    else:
        keys = ("chosen_response", "rejected_response") if layout == "nemo" else ("chosen", "rejected")
        row = {"prompt": prompt, keys[0]: chosen, keys[1]: rejected, **({"tools": tools} if tools else {})}
    if draw(st.integers(0, 3)) == 0:
        row[draw(st.sampled_from(sorted(row)))] = draw(junk)
    return row


@pytest.fixture(scope="module")
def byte_chatml(model_dir):
    from nemo_customizer.checkpoints.resolve import load_tokenizer

    return load_tokenizer(model_dir, "chatml-tools")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=preference_rows(), max_seq_length=st.integers(4, 400))
def test_generated_rows_are_refused_clearly_or_tokenize_into_sound_pairs(byte_chatml, row, max_seq_length):
    from nemo_customizer.data.formats.preference import build_example
    from nemo_customizer.data.preference_rows import preference_row_problems

    problems = preference_row_problems(row)
    assert all(isinstance(p, str) and re.match(r'(field|fields|row|the responses) ', p) for p in problems), problems
    event("refused" if problems else "accepted")
    if problems:
        return
    example = build_example(row, "d.jsonl:1")
    (full,), _ = tokenize_examples([example], byte_chatml, 1 << 30)
    out, stats = tokenize_examples([example], byte_chatml, max_seq_length)
    event(f"{stats.unchanged} unchanged, {stats.truncated} truncated, {stats.dropped} dropped")
    assert stats.kept + stats.dropped == 1 and len(out) == stats.kept
    if not out:
        return
    (result,) = out
    start = prompt_length(result.chosen)
    assert start == prompt_length(result.rejected) and result.chosen.input_ids[:start] == \
        result.rejected.input_ids[:start]
    full_start = prompt_length(full.chosen)
    for sequence, whole in ((result.chosen, full.chosen), (result.rejected, full.rejected)):
        assert len(sequence.input_ids) <= max_seq_length and not any(sequence.loss_mask[:start])
        # A response is never cut: the tokens and mask after the prompt are the untruncated pair's.
        assert sequence.input_ids[start:] == whole.input_ids[full_start:]
        assert sequence.loss_mask[start:] == whole.loss_mask[full_start:]
    assert (result == full) == (stats.unchanged == 1)


def test_the_job_log_counts_preference_rows_as_pairs():
    from nemo_customizer.data.truncation import TruncationStats

    assert TruncationStats(unchanged=3, truncated=1, unit="pairs").describe() == "4 pairs kept (1 truncated), 0 dropped"
    assert TruncationStats(unchanged=2).describe() == "2 examples kept (0 truncated), 0 dropped"
