"""Chat templates, assistant-only loss masks and chat truncation, checked by hand on real template texts.

ChatML is SmolLM2's own tokenizer and template. Llama 3.1 (with tools) and Mistral v0.3 ([INST], tools) use their
official template texts (tests/data/chat/*.jinja) on SmolLM2's byte-level BPE with the families' special tokens added:
no download needed, and the template logic under test is the real one. "Trained" below is the decoded text of each
run of tokens whose loss_mask is 1; it must be exactly the assistant content + its end-of-turn token.
"""

import json
from pathlib import Path

import pytest

from nemo_customizer.data import DatasetError, TokenizedExample, load_dataset, tokenize_examples
from nemo_customizer.data.formats import Conversation

TEMPLATES = Path(__file__).parent / "data" / "chat"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint

    return AutoTokenizer.from_pretrained(str(resolve_embedded_checkpoint("smollm2-135m-instruct", None)))


def family_tokenizer(template: str, bos: str, eos: str, specials: list[str]):
    tok = smollm2_tokenizer()
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": specials})
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


@pytest.fixture(scope="module")
def chatml():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def llama31():
    return family_tokenizer("llama3_1_instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                            ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"])


@pytest.fixture(scope="module")
def mistral():
    return family_tokenizer("mistral_instruct_v0_3.jinja", "<s>", "</s>",
                            ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                             "[TOOL_RESULTS]", "[/TOOL_RESULTS]"])


def conv(*messages, tools=None, origin="chat.jsonl:1"):
    return Conversation(messages=tuple(messages), tools=tuple(tools) if tools else None, origin=origin)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def weather_call(call_id="call_1"):
    return {"role": "assistant", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def encode(tok, conversation, max_seq_length=4096) -> TokenizedExample:
    out, stats = tokenize_examples([conversation], tok, max_seq_length)
    assert len(out) == 1, stats.describe()
    return out[0]


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


MATH = (user("What is 2+2?"), assistant("4"), user("And 3+3?"), assistant("6"))


# --- ChatML (SmolLM2) ---------------------------------------------------------------------------------------------

def test_chatml_trains_each_answer_and_im_end_not_the_injected_system_prompt(chatml):
    example = encode(chatml, conv(*MATH))
    assert chatml.decode(example.input_ids) == (
        SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n")
    assert trained(chatml, example) == ["4<|im_end|>", "6<|im_end|>"]  # not "assistant\n", not the "\n" after
    # The tokens are exactly what transformers' own apply_chat_template(tokenize=True) gives.
    assert example.input_ids == list(chatml.apply_chat_template(list(MATH), tokenize=True, return_dict=False))


def test_chatml_with_own_system_prompt(chatml):
    example = encode(chatml, conv({"role": "system", "content": "Answer in French."}, user("Hi"), assistant("Salut !")))
    assert chatml.decode(example.input_ids) == ("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n"
                                                "Hi<|im_end|>\n<|im_start|>assistant\nSalut !<|im_end|>\n")
    assert trained(chatml, example) == ["Salut !<|im_end|>"]


def test_template_without_tool_support_is_an_error_not_a_silent_drop(chatml):
    rows = [conv(user("Weather in Paris?"), assistant("Sunny."), tools=[WEATHER_TOOL], origin="d.jsonl:4"),
            conv(user("Weather?"), weather_call(), {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                 assistant("18C."), origin="d.jsonl:9")]
    with pytest.raises(DatasetError) as info:
        tokenize_examples(rows, chatml, 4096)
    lines = str(info.value).splitlines()
    assert lines[0] == "2 problems in the dataset:"
    assert lines[1] == "  d.jsonl:4: the chat template cannot render tools (it never refers to `tools`)."
    assert lines[2] == "  d.jsonl:9: the chat template cannot render tool calls (it never refers to `tool_calls`)."
    assert "set model.chat_template" in lines[3]


def test_template_that_mentions_tools_but_drops_them_is_an_error(chatml):
    chatml = smollm2_tokenizer()
    chatml.chat_template = chatml.chat_template.replace("{% for", "{% if tools %}{% endif %}{% for", 1)
    with pytest.raises(DatasetError, match="cannot render tools: tool 'get_weather' does not appear"):
        tokenize_examples([conv(user("Weather?"), assistant("Sunny."), tools=[WEATHER_TOOL])], chatml, 4096)


def test_tokenizer_without_chat_template_is_an_error():
    tok = smollm2_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template; set model.chat_template"):
        tokenize_examples([conv(*MATH)], tok, 4096)


# --- Llama 3.1 ----------------------------------------------------------------------------------------------------

LLAMA_HEADER = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")


def test_llama31_date_header_and_role_headers_are_not_trained(llama31):
    example = encode(llama31, conv(*MATH))
    assert llama31.decode(example.input_ids) == (
        LLAMA_HEADER + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "And 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>")
    assert trained(llama31, example) == ["4<|eot_id|>", "6<|eot_id|>"]


def test_llama31_tool_call_is_trained_as_rendered_json_and_never_double_encoded(llama31):
    rows = conv({"role": "system", "content": "Be brief."}, user("Weather in Paris?"), weather_call(),
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"}, assistant("It is 18°C in Paris."),
                tools=[WEATHER_TOOL])
    example = encode(llama31, rows)
    text = llama31.decode(example.input_ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                           "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions")
    assert '"name": "get_weather",' in text  # the tool schema, rendered into the first user message
    assert trained(llama31, example) == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                         "It is 18°C in Paris.<|eot_id|>"]
    assert text.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n"18C"<|eot_id|>'
                         "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 18°C in Paris.<|eot_id|>")


def test_llama31_arguments_given_as_json_string_or_object_train_identically(tmp_path, llama31):
    rows = []
    for arguments in ('{"city": "Paris"}', {"city": "Paris"}):
        call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}
        rows.append({"messages": [user("Weather?"), call], "tools": [WEATHER_TOOL]})
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = tokenize_examples(load_dataset(f, val_fraction=0.0).train, llama31, 4096)[0]
    assert a == b and '\\"' not in llama31.decode(a.input_ids)


def test_llama31_template_exception_names_the_row(llama31):
    two_calls = {"role": "assistant", "tool_calls": weather_call()["tool_calls"] * 2}
    with pytest.raises(DatasetError) as info:
        tokenize_examples([conv(user("Weather?"), two_calls, tools=[WEATHER_TOOL], origin="t.jsonl:7")], llama31, 4096)
    assert str(info.value).startswith("t.jsonl:7: the chat template cannot render tools: TemplateError: This model "
                                      "only supports single tool-calls at once!")


# --- Mistral v0.3 ([INST]) -----------------------------------------------------------------------------------------

def test_mistral_inst_trains_answer_and_eos(mistral):
    example = encode(mistral, conv(*MATH))
    assert mistral.decode(example.input_ids) == "<s>[INST] What is 2+2?[/INST] 4</s>[INST] And 3+3?[/INST] 6</s>"
    # The template puts a space before each answer; it belongs to what the model generates after [/INST].
    assert trained(mistral, example) == [" 4</s>", " 6</s>"]


def test_mistral_tools_before_last_user_message(mistral):
    # Mistral v0.3 renders [AVAILABLE_TOOLS] before the *last* user message, so a prefix of the conversation is not a
    # prefix of its render: the assistant turns are found in the full render instead.
    rows = conv(user("Weather in Paris?"), weather_call("call00001"),
                {"role": "tool", "tool_call_id": "call00001", "content": "18C"}, assistant("It is 18C."),
                user("Thanks"), assistant("Welcome."), tools=[WEATHER_TOOL])
    example = encode(mistral, rows)
    text = mistral.decode(example.input_ids)
    assert text.startswith("<s>[INST] Weather in Paris?[/INST][TOOL_CALLS]")
    assert "[/AVAILABLE_TOOLS][INST] Thanks[/INST] Welcome.</s>" in text
    assert trained(mistral, example) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
        " It is 18C.</s>", " Welcome.</s>"]


def test_mistral_system_prompt_only_renders_next_to_a_final_user_message(mistral):
    # The official v0.3 template drops the system prompt unless the last message is from the user; the prompt the
    # assistant answers is then rendered differently on its own, and the mask comes from diffing against an empty
    # assistant turn (so the separating space stays untrained; SentencePiece tokenizers fold it into the word).
    example = encode(mistral, conv({"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello there.")))
    assert mistral.decode(example.input_ids) == "<s>[INST] Hi[/INST] Hello there.</s>"
    assert trained(mistral, example) == [" Hello there.</s>"]


# --- truncation ---------------------------------------------------------------------------------------------------

def test_fitting_conversation_is_unchanged(chatml):
    full = encode(chatml, conv(*MATH))
    out, stats = tokenize_examples([conv(*MATH)], chatml, len(full.input_ids))
    assert out == [full] and (stats.unchanged, stats.truncated, stats.dropped) == (1, 0, 0)


def test_over_long_conversation_drops_whole_trailing_turns(chatml):
    full = encode(chatml, conv(*MATH))
    first_exchange = encode(chatml, conv(*MATH[:2]))
    out, stats = tokenize_examples([conv(*MATH)], chatml, len(full.input_ids) - 1)
    assert out == [first_exchange] and (stats.unchanged, stats.truncated, stats.dropped) == (0, 1, 0)
    assert chatml.decode(out[0].input_ids).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    assert trained(chatml, out[0]) == ["4<|im_end|>"]


def test_over_long_first_answer_is_cut_inside_and_still_closed(chatml):
    long_answer = conv(user("Count."), assistant("one two three four five six seven eight"), user("More"),
                       assistant("nine"))
    prompt_len = len(encode(chatml, conv(user("Count."), assistant("x"))).input_ids) - 3  # minus "x<|im_end|>\n"
    out, stats = tokenize_examples([long_answer], chatml, prompt_len + 4)
    (example,) = out
    assert len(example.input_ids) == prompt_len + 4 and stats.truncated == 1
    assert chatml.decode(example.input_ids).endswith("<|im_start|>assistant\none two three<|im_end|>")
    assert trained(chatml, example) == ["one two three<|im_end|>"]


def test_row_left_without_trainable_token_is_dropped_and_counted(chatml):
    rows = [conv(*MATH, origin="d.jsonl:1"), conv(user("word " * 200), assistant("ok"), origin="d.jsonl:2")]
    out, stats = tokenize_examples(rows, chatml, 64)
    assert len(out) == 1 and (stats.unchanged, stats.truncated, stats.dropped) == (1, 0, 1)
    assert stats.dropped_origins == ["d.jsonl:2"]
    assert all(sum(e.loss_mask) > 0 and len(e.input_ids) <= 64 for e in out)
