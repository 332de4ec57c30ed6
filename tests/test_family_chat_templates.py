"""Every family's own chat template, end to end: the training mask, the prompt ``Generator.chat`` and the server
render, the end-of-turn stop, tool calls in the family's syntax, ``<think>`` reasoning, and the clear errors.

The templates are the families' published ones (tests/data/chat/*.jinja; each file's first comment names its
model), on SmolLM2's byte-level BPE with the family's special tokens added: no download. Generation runs the real
KV-cache engine, scheduler and HTTP app over a scripted model whose next-token logits are a one-hot of a known
reply, since what is under test is how prompts are built, where generation stops and how replies are parsed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from nemo_customizer.data import DatasetError, TokenizedExample, tokenize_examples
from nemo_customizer.data.formats import Conversation
from nemo_customizer.inference import Generator
from nemo_customizer.inference.chat import ChatTemplate, ReasoningStream, split_reasoning
from nemo_customizer.inference.tool_calls import detect_tool_syntax, parse_tool_calls

TEMPLATES = Path(__file__).parent / "data" / "chat"
LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|end_of_text|>")
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
MISTRAL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]")
GEMMA = ("<start_of_turn>", "<end_of_turn>")


@dataclasses.dataclass(frozen=True)
class Family:
    template: str
    """File under tests/data/chat."""
    specials: tuple
    """Special tokens added to the tokenizer (besides bos and eos)."""
    bos: Optional[str]
    eos: str
    """The tokenizer's eos token."""
    end_of_text: str
    """The checkpoint's eos (config.json): what the Generator stops at without a template."""
    end_of_turn: str
    """What the model emits to end its turn in this template."""
    math_trained: tuple
    """The trained text of MATH (with a system message where the template takes one)."""
    plain: tuple = ()
    """Added tokens that are not special (Qwen's <tool_call>, <think>): they stay in decoded text."""
    tool_syntax: Optional[str] = None
    """None: the template cannot render tools."""
    system: bool = True
    """Whether the template takes a system message."""


FAMILIES = {
    "llama3.1": Family("llama3_1_instruct.jinja", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
                       "<|eot_id|>", ("4<|eot_id|>", "6<|eot_id|>"), tool_syntax="llama3"),
    "llama3.2": Family("llama3_2_instruct.jinja", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
                       "<|eot_id|>", ("4<|eot_id|>", "6<|eot_id|>"), tool_syntax="llama3"),
    "llama-nemotron": Family("llama_nemotron_v1.jinja", LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
                             "<|end_of_text|>", "<|eot_id|>", ("4<|eot_id|>", "6<|eot_id|>")),
    "qwen2.5": Family("qwen2_5_instruct.jinja", CHATML, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
                      ("4<|im_end|>", "6<|im_end|>"), plain=("<tool_call>", "</tool_call>"), tool_syntax="hermes"),
    "qwen3": Family("qwen3.jinja", CHATML, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
                    # the last turn always gets a think block; earlier ones are rendered without
                    ("4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"),
                    plain=("<tool_call>", "</tool_call>", "<think>", "</think>"), tool_syntax="hermes"),
    "mistral-v0.3": Family("mistral_instruct_v0_3.jinja", MISTRAL, "<s>", "</s>", "</s>", "</s>",
                           # with a system message (moved into the last user turn) the space after [/INST] stays
                           # untrained; a SentencePiece vocabulary folds it into the word
                           ("4</s>", "6</s>"), tool_syntax="mistral"),
    "mistral-small-3.2": Family("mistral_small_3_2.jinja", MISTRAL + ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]"),
                                "<s>", "</s>", "</s>", "</s>", ("4</s>", "6</s>"), tool_syntax="mistral_args"),
    "phi-3.5": Family("phi3_5_mini_instruct.jinja", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>",
                      "<|endoftext|>", "<|endoftext|>", "<|end|>", ("4<|end|>", "6<|end|>")),
    "phi-4": Family("phi4.jinja", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|endoftext|>", "<|endoftext|>",
                    "<|endoftext|>", "<|im_end|>", ("4<|im_end|>", "6<|im_end|>")),
    "gemma2": Family("gemma2_it.jinja", GEMMA, "<bos>", "<eos>", "<eos>", "<end_of_turn>",
                     ("4<end_of_turn>", "6<end_of_turn>"), system=False),
    "gemma3": Family("gemma3_it.jinja", GEMMA, "<bos>", "<eos>", "<eos>", "<end_of_turn>",
                     ("4<end_of_turn>", "6<end_of_turn>")),
}
TOOL_FAMILIES = sorted(name for name, family in FAMILIES.items() if family.tool_syntax)
TOOLLESS_FAMILIES = sorted(name for name, family in FAMILIES.items() if not family.tool_syntax)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
SYSTEM = {"role": "system", "content": "You are terse."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


MATH = (user("What is 2+2?"), assistant("4"), user("And 3+3?"), assistant("6"))
# the call id has 9 letters and digits, as Mistral v0.3's template demands
WEATHER_CALL = {"role": "assistant", "tool_calls": [
    {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
# a call as each family's model writes it, then its end-of-turn token
GENERATED_CALL = {
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>',
    "mistral_args": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>',
}


@functools.lru_cache(maxsize=None)
def _smollm2():
    from transformers import AutoTokenizer

    from nemo_customizer.checkpoints.embedded import resolve_embedded_checkpoint

    return AutoTokenizer.from_pretrained(str(resolve_embedded_checkpoint("smollm2-135m-instruct", None)))


@functools.lru_cache(maxsize=None)
def tokenizer_of(name: str):
    family = FAMILIES[name]
    tokenizer = copy.deepcopy(_smollm2())
    tokens = {"eos_token": family.eos, "additional_special_tokens": list(family.specials)}
    tokenizer.add_special_tokens({**tokens, **({"bos_token": family.bos} if family.bos else {})})
    tokenizer.add_tokens(list(family.plain))
    tokenizer.chat_template = (TEMPLATES / family.template).read_text()
    return tokenizer


def conversation(name: str, *messages):
    """``messages`` after the system message where the family's template takes one."""
    return ((SYSTEM,) if FAMILIES[name].system else ()) + messages


def encode(tokenizer, messages, tools=None) -> TokenizedExample:
    rows = [Conversation(messages=tuple(messages), tools=tuple(tools) if tools else None, origin="chat.jsonl:1")]
    out, stats = tokenize_examples(rows, tokenizer, 4096)
    assert len(out) == 1, stats.describe()
    return out[0]


def trained(tokenizer, example: TokenizedExample) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, run = [], []
    for token, m in zip(example.input_ids + [None], example.loss_mask + [0]):
        if m:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


class Scripted(torch.nn.Module):
    """A model in megatron-core's calling convention whose next token is always the next one of ``reply``; it keeps
    the prompt it was prefilled with."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.script = tokenizer(reply, add_special_tokens=False)["input_ids"]
        self.vocab = len(tokenizer)
        self.prompts = []
        self.calls = 0

    def forward(self, tokens, positions, attention_mask=None, inference_context=None, runtime_gather_output=True):
        if self.calls == 0:
            self.prompts.append(tokens[0].tolist())  # the prefill: (1, prompt length)
        logits = torch.full((tokens.shape[0], tokens.shape[1], self.vocab), -1e4)  # (b, s, vocab)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


def generator(name: str, reply: str) -> Generator:
    tokenizer = tokenizer_of(name)
    return Generator(Scripted(tokenizer, reply), tokenizer, device=torch.device("cpu"), max_context=8192,
                     eos_ids=[tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_text)])


def prompt_of(name: str, messages, tools=None) -> list[int]:
    """What transformers renders: the reference prompt."""
    return tokenizer_of(name).apply_chat_template(list(messages), tools=tools, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)


@pytest.fixture
def serve():
    """``serve(generator)``: an HTTP client of the OpenAI app over that generator, its scheduler running until the
    test ends."""
    from fastapi.testclient import TestClient

    from nemo_customizer.config import ServingConfig
    from nemo_customizer.serving.adapters import AdapterRegistry
    from nemo_customizer.serving.app import create_app
    from nemo_customizer.serving.scheduler import Scheduler
    from nemo_customizer.serving.service import Service

    clients = []

    def start(gen: Generator):
        service = Service(generator=gen, registry=AdapterRegistry(None, "m"), scheduler=Scheduler(gen, 4),
                          settings=ServingConfig(), api_key=None)
        client = TestClient(create_app(service))
        client.__enter__()  # runs the lifespan: the scheduler thread
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def chat_request(client, messages, **fields):
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": list(messages),
                                                          "max_tokens": 64, "temperature": 0, **fields})
    return response.status_code, response.json()


def stream_request(client, messages, **fields):
    """The streamed chunks' choice deltas (``data: [DONE]`` dropped)."""
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": list(messages), "max_tokens": 64,
                                                          "temperature": 0, "stream": True, **fields})
    assert response.status_code == 200
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event)["choices"][0] for event in events[:-1]]


def joined(choices, key):
    return "".join(choice["delta"].get(key) or "" for choice in choices)


# ---- (a) training: the mask is exactly the assistant turns, with the family's end-of-turn token ----

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_masks_exactly_the_assistant_turns(name):
    tokenizer, family = tokenizer_of(name), FAMILIES[name]
    messages = conversation(name, *MATH)
    example = encode(tokenizer, messages)
    assert tuple(trained(tokenizer, example)) == family.math_trained
    # the tokens are transformers' own rendering of the conversation
    assert example.input_ids == tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False)


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_training_masks_tool_calls_as_the_family_renders_them(name):
    tokenizer, family = tokenizer_of(name), FAMILIES[name]
    result = {"role": "tool", "tool_call_id": "call00001", "content": "18C"}
    messages = (user("Weather in Paris?"), WEATHER_CALL, result, assistant("It is 18C."))
    call = {"llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
            "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
            "mistral_args": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>'}[family.tool_syntax]
    answer = {"qwen3": "<think>\n\n</think>\n\n", "mistral-v0.3": " "}.get(name, "") + "It is 18C." + family.end_of_turn
    assert trained(tokenizer, encode(tokenizer, messages, [WEATHER])) == [call, answer]


def test_training_keeps_qwen3_reasoning_only_on_the_last_turn():
    """Qwen3's template drops the reasoning of turns before the last user message: those train as rendered."""
    tokenizer = tokenizer_of("qwen3")
    messages = (user("What is 2+2?"), assistant("<think>\nAdd.\n</think>\n\n4"), user("And 3+3?"),
                assistant("<think>\nAdd again.\n</think>\n\n6"))
    assert trained(tokenizer, encode(tokenizer, messages)) == ["4<|im_end|>",
                                                               "<think>\nAdd again.\n</think>\n\n6<|im_end|>"]


def test_training_on_phi35_ends_each_turn_at_end_not_at_the_final_eos():
    tokenizer = tokenizer_of("phi-3.5")
    example = encode(tokenizer, MATH)
    assert tokenizer.decode(example.input_ids).endswith("<|assistant|>\n6<|end|>\n<|endoftext|>")
    assert trained(tokenizer, example) == ["4<|end|>", "6<|end|>"]  # the eos after the last <|end|> is never generated


def test_gemma3_folds_the_system_message_into_the_first_user_turn_and_gemma2_refuses_it():
    gemma3 = tokenizer_of("gemma3")
    example = encode(gemma3, (SYSTEM,) + MATH)
    assert gemma3.decode(example.input_ids).startswith(
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>")
    assert trained(gemma3, example) == ["4<end_of_turn>", "6<end_of_turn>"]
    with pytest.raises(DatasetError, match="chat.jsonl:1: the chat template failed: TemplateError: System role not "
                                           "supported"):
        encode(tokenizer_of("gemma2"), (SYSTEM,) + MATH)


@pytest.mark.parametrize("name", TOOLLESS_FAMILIES)
def test_training_rows_with_tools_on_a_template_without_tools_are_an_error(name):
    with pytest.raises(DatasetError, match="the chat template cannot render tools \\(it never refers to `tools`\\)"):
        encode(tokenizer_of(name), (user("Weather in Paris?"), assistant("Sunny.")), [WEATHER])


# ---- (b) generation: the template's prompt, stopping at its end-of-turn token ----

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_chat_renders_the_templates_prompt_and_stops_at_its_end_of_turn(name):
    family, tokenizer = FAMILIES[name], tokenizer_of(name)
    messages = conversation(name, user("Weather in Paris?"))
    gen = generator(name, f"Sunny.{family.end_of_turn}ignored")
    reply = gen.chat(messages, max_tokens=30)
    assert gen.model.prompts == [prompt_of(name, messages)]
    assert reply.message == {"role": "assistant", "content": "Sunny."} and reply.finish_reason == "stop"
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert reply.token_ids[-1] == end_of_turn
    assert ChatTemplate(tokenizer).end_of_turn_ids >= {end_of_turn}  # found in the template, not taken from eos


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_server_renders_the_templates_prompt_and_stops_at_its_end_of_turn(name, serve):
    family = FAMILIES[name]
    messages = conversation(name, user("Weather in Paris?"))
    gen = generator(name, f"Sunny.{family.end_of_turn}ignored")
    client = serve(gen)
    status, body = chat_request(client, messages)
    assert status == 200, body
    assert gen.model.prompts == [prompt_of(name, messages)]
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Sunny."} and choice["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(prompt_of(name, messages))
    assert body["usage"]["completion_tokens"] == len(tokenizer_of(name)(f"Sunny.{family.end_of_turn}",
                                                                       add_special_tokens=False)["input_ids"])


# ---- (c) tool calls in the family's syntax ----

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tool_syntax_is_detected_from_the_template(name):
    family = FAMILIES[name]
    assert detect_tool_syntax(tokenizer_of(name).chat_template) == family.tool_syntax
    assert ChatTemplate(tokenizer_of(name)).tool_syntax == family.tool_syntax


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_chat_parses_the_familys_tool_calls_and_takes_them_back(name):
    family = FAMILIES[name]
    messages = conversation(name, user("Weather in Paris?"))
    gen = generator(name, GENERATED_CALL[family.tool_syntax])
    reply = gen.chat(messages, tools=[WEATHER], max_tokens=60)
    assert gen.model.prompts == [prompt_of(name, messages, [WEATHER])]
    assert reply.finish_reason == "tool_calls" and reply.message["content"] is None
    [call] = reply.message["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the OpenAI round trip: the reply and the tool's result go back in and render (Mistral v0.3 checks the id)
    history = [*messages, reply.message, {"role": "tool", "tool_call_id": call["id"], "content": "18C"}]
    answer = generator(name, f"18C.{family.end_of_turn}").chat(history, tools=[WEATHER], max_tokens=20)
    assert answer.message == {"role": "assistant", "content": "18C."}


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_server_returns_the_familys_tool_calls_whole_and_streamed(name, serve):
    family = FAMILIES[name]
    messages = conversation(name, user("Weather in Paris?"))
    status, body = chat_request(serve(generator(name, GENERATED_CALL[family.tool_syntax])), messages, tools=[WEATHER])
    assert status == 200, body
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    chunks = stream_request(serve(generator(name, GENERATED_CALL[family.tool_syntax])), messages, tools=[WEATHER])
    calls = [call for c in chunks for call in c["delta"].get("tool_calls") or []]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather")]
    assert chunks[-1]["finish_reason"] == "tool_calls"


def test_mistral_small_32_calls_back_to_back_after_text():
    reply = ('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'
             "</s>")
    result = generator("mistral-small-3.2", reply).chat([user("Weather and time in Paris?")], tools=[WEATHER, CLOCK])
    assert result.message["content"] == "Let me check." and result.finish_reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    # [TOOL_CALLS] and [ARGS] are special tokens: kept in the text, the calls could not be told from the content
    assert generator("mistral-small-3.2", reply).chat([user("Hi")], max_tokens=60).message["content"] == reply[:-4]


def test_mistral_args_syntax_parses_and_refuses_like_the_others():
    content, calls = parse_tool_calls('[TOOL_CALLS]a[CALL_ID]x1y2z3w4v[ARGS]{"n": 1}[TOOL_CALLS] b [ARGS] {}',
                                      "mistral_args")
    assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", '{"n": 1}'), ("b", "{}")]
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)  # ids Mistral's templates accept
    for text in ("plain text", "[TOOL_CALLS]a", "[TOOL_CALLS][ARGS]{}", "[TOOL_CALLS]a[ARGS]{",
                 "[TOOL_CALLS]a b[ARGS]{}", "[TOOL_CALLS]a[ARGS][1]", '[TOOL_CALLS]a[ARGS]{"n": 1} and more',
                 "get_weather{}"):
        assert parse_tool_calls(text, "mistral_args") == (text, [])


# ---- (d) a template that cannot render tools, and one that refuses a system message ----

@pytest.mark.parametrize("name", TOOLLESS_FAMILIES)
def test_tools_on_a_template_without_tools_are_the_clear_error(name, serve):
    messages = conversation(name, user("Weather in Paris?"))
    with pytest.raises(ValueError, match="cannot render tools \\(it never refers to `tools`\\)"):
        generator(name, "x").chat(messages, tools=[WEATHER])
    status, body = chat_request(serve(generator(name, "x")), messages, tools=[WEATHER])
    assert status == 400 and body["error"]["param"] == "tools"
    assert "cannot render tools (it never refers to `tools`)" in body["error"]["message"]


def test_gemma2_refuses_a_system_message_with_the_templates_own_words(serve):
    with pytest.raises(ValueError, match="could not render these messages: System role not supported"):
        generator("gemma2", "x").chat([SYSTEM, user("Hi")])
    status, body = chat_request(serve(generator("gemma2", "x")), [SYSTEM, user("Hi")])
    assert status == 400 and "System role not supported" in body["error"]["message"]


# ---- reasoning: Qwen3's <think> block becomes reasoning_content, as vLLM's reasoning parser returns it ----

THOUGHT = "<think>\nParis in June is usually sunny.\n</think>\n\nIt is sunny.<|im_end|>"


def test_qwen3_reasoning_is_returned_as_reasoning_content():
    reply = generator("qwen3", THOUGHT).chat([user("Weather in Paris?")], max_tokens=60)
    assert reply.message == {"role": "assistant", "content": "It is sunny.",
                             "reasoning_content": "Paris in June is usually sunny."}
    cut = generator("qwen3", THOUGHT).chat([user("Weather in Paris?")], max_tokens=4)  # stopped inside the thought
    assert cut.message["content"] is None and cut.finish_reason == "length"
    assert cut.message["reasoning_content"] and "Paris in June".startswith(cut.message["reasoning_content"])
    # the round trip: the message with its reasoning_content renders (the template drops it from earlier turns)
    history = [user("Weather in Paris?"), reply.message, user("And tomorrow?")]
    assert "It is sunny." in tokenizer_of("qwen3").decode(ChatTemplate(tokenizer_of("qwen3")).render(history))
    # with a tool call after the thought, both are returned
    call = "<think>\nI should look it up.\n</think>\n\n" + GENERATED_CALL["hermes"]
    both = generator("qwen3", call).chat([user("Weather in Paris?")], tools=[WEATHER], max_tokens=80)
    assert both.message["reasoning_content"] == "I should look it up." and both.message["content"] is None
    assert [c["function"]["name"] for c in both.message["tool_calls"]] == ["get_weather"]


def test_templates_without_think_blocks_keep_the_text_as_content():
    text = "<think>\nhm\n</think>\n\nSunny."
    reply = generator("qwen2.5", text + "<|im_end|>").chat([user("Weather?")], max_tokens=60)
    assert reply.message == {"role": "assistant", "content": text}


def test_server_returns_and_streams_qwen3_reasoning(serve):
    status, body = chat_request(serve(generator("qwen3", THOUGHT)), [user("Weather in Paris?")])
    assert status == 200 and body["choices"][0]["message"] == {
        "role": "assistant", "content": "It is sunny.", "reasoning_content": "Paris in June is usually sunny."}
    chunks = stream_request(serve(generator("qwen3", THOUGHT)), [user("Weather in Paris?")])
    assert joined(chunks, "reasoning_content") == "Paris in June is usually sunny."
    assert joined(chunks, "content") == "It is sunny."
    assert chunks[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("text", [
    "<think>\nabc\n</think>\n\nanswer", "<think>a</thi", "<think>", "<thi", "plain", "", "  <think>x</think>y",
    "<think>\n\n</think>\n\n", "no <think>here</think>", "<think>a</think>b</think>c",
])
def test_streamed_reasoning_adds_up_to_the_whole(text):
    whole = split_reasoning(text)
    expected = dict(zip(("reasoning_content", "content"), whole or ("", text)))
    for size in (1, 2, 5):
        stream, got = ReasoningStream(), {"reasoning_content": "", "content": ""}
        pieces = [text[at:at + size] for at in range(0, len(text), size)] or [""]
        for k, piece in enumerate(pieces):
            for key, delta in stream.push(piece, final=k == len(pieces) - 1).items():
                got[key] += delta
        assert got == expected, (text, size)


def test_evaluation_scores_the_answer_after_qwen3_reasoning(tmp_path):
    """Held-out answers of a reasoning template are the content after its ``<think>`` block, as the server returns."""
    from nemo_customizer.evaluation.heldout import read_heldout, tokenize_heldout
    from nemo_customizer.evaluation.runner import EvaluationOptions, _generate

    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps({"messages": [user("Weather in Paris?"),
                                             {"role": "assistant", "content": "It is sunny."}]}) + "\n")
    heldout = read_heldout(path)
    gen = generator("qwen3", THOUGHT)
    tokenized = tokenize_heldout(heldout, gen.tokenizer, 512)
    predictions, calls = _generate(gen, heldout, tokenized, EvaluationOptions(metrics=("exact_match",),
                                                                              progress=False), 60, "base")
    assert predictions == ["It is sunny."] and calls == [[]]
