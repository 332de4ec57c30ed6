"""The OpenAI-compatible server, driven by the official ``openai`` client against a live uvicorn on loopback.

One tiny random Llama (byte tokenizer + ChatML with Hermes tools) is served with three adapters on disk: ``alpha``
(r=4, q/v), ``beta`` (r=8, o/gate/down, in a job directory's ``adapter/``) and ``wide`` (r=32, above the server's
max_lora_rank=16). Greedy results are compared with ``nemo_customizer.generate()``, computed before the server
loads its own copy of the model.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from safetensors.torch import save_file

import nemo_customizer
from nemo_customizer import cli
from nemo_customizer.config import ConfigError, compose_config
from nemo_customizer.distributed.parallel import free_port
from nemo_customizer.models.llama import HF_MODULE_PREFIX
from nemo_customizer.peft.export import peft_adapter_config
from nemo_customizer.config import LoraConfig

from _tiny import write_tiny_model_dir

KEY = "test-key"
PROMPTS = ["hello world", "The quick brown fox", "x"]
QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# the tiny checkpoint of write_tiny_model_dir: 2 layers, hidden 64, 4 heads of 16, 2 kv heads, ffn 128
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 128),
          "up_proj": (64, 128), "down_proj": (128, 64)}  # (in, out)


def _write_adapter(directory, rank, targets, seed):
    """An HF PEFT adapter with random A and B (B nonzero, so it changes the output)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(2):
        for name in targets:
            fan_in, fan_out = SHAPES[name]
            prefix = f"base_model.model.model.layers.{layer}.{HF_MODULE_PREFIX[name]}.{name}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
            weights[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.3
    directory.mkdir(parents=True)
    save_file(weights, str(directory / "adapter_model.safetensors"))
    config = peft_adapter_config(LoraConfig(adapter_dim=rank, alpha=2.0 * rank, target_modules=targets), "tiny",
                                 targets)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_tiny_model_dir(root / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(str(root / "model"))
    adapters = root / "adapters"
    paths = {"alpha": _write_adapter(adapters / "alpha", 4, ["q_proj", "v_proj"], seed=1),
             "beta": _write_adapter(adapters / "beta" / "adapter", 8, ["o_proj", "gate_proj", "down_proj"], seed=2)}
    _write_adapter(adapters / "wide", 32, ["q_proj"], seed=3)
    _write_adapter(root / "spare", 4, ["k_proj", "up_proj"], seed=4)
    return root, paths


def _overrides(root):
    return ["model=hf-llama", f"model.checkpoint={root / 'model'}", "model.chat_template=chatml-tools",
            "model.max_seq_length=2048", "device=cpu"]


@pytest.fixture(scope="module")
def expected(files):
    """``nemo_customizer.generate()`` greedy results: {(adapter, prompt index): text}, plus chat and spare."""
    root, paths = files
    settings = dict(config="hf-llama", model={"checkpoint": str(root / "model"), "chat_template": "chatml-tools",
                                                 "max_seq_length": 2048},
                    device="cpu", max_tokens=12)
    results = {}
    for name, path in [(None, None), ("alpha", paths["alpha"]), ("beta", paths["beta"])]:
        for i, prompt in enumerate(PROMPTS):
            results[name, i] = nemo_customizer.generate(prompt, adapter=path and str(path), **settings)
        results[name, "chat"] = nemo_customizer.generate(messages=QUESTION, adapter=path and str(path), **settings)
    results["spare", 0] = nemo_customizer.generate(PROMPTS[0], adapter=str(root / "spare"), **settings)
    return results


@pytest.fixture(scope="module")
def server(files, expected):
    """(service, base URL) of a live server; ``expected`` runs first: generate() sets up its own parallel state."""
    from nemo_customizer.serving.app import create_app
    from nemo_customizer.serving.service import build_service

    root, _ = files
    cfg = compose_config(_overrides(root) + [
        "serving.model_name=tiny", f"serving.adapters_dir={root / 'adapters'}", "serving.max_lora_rank=16",
        "serving.max_tokens=128", "serving.max_request_bytes=65536", f"serving.api_key={KEY}",
        "serving.max_batch_size=8", "serving.log_level=warning"])
    service = build_service(cfg)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield service, f"http://127.0.0.1:{port}/v1"
    uv.should_exit = True
    thread.join(timeout=30)
    service.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0, timeout=60)


def _complete(client, model, prompt, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=kwargs.pop("max_tokens", 12),
                                     temperature=kwargs.pop("temperature", 0), **kwargs)


# ---- models, completions, chat ----

def test_models_lists_the_base_and_every_adapter(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny@alpha", "tiny@beta", "tiny@wide"]
    card = client.models.retrieve("tiny@beta")
    assert (card.id, card.object, card.owned_by) == ("tiny@beta", "model", "nemo_customizer")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny@nothing")


def test_completions_greedy_equal_generate_for_base_and_adapters(client, expected):
    texts = {}
    for model, adapter in [("tiny", None), ("tiny@alpha", "alpha"), ("beta", "beta")]:
        for i, prompt in enumerate(PROMPTS):
            response = _complete(client, model, prompt)
            [choice] = response.choices
            assert choice.text == expected[adapter, i], (model, prompt)
            texts[adapter, i] = choice.text
    # two adapters give different outputs, and both differ from the base
    assert len({texts[None, 0], texts["alpha", 0], texts["beta", 0]}) == 3
    response = _complete(client, "tiny", PROMPTS[1])
    assert response.object == "text_completion" and response.model == "tiny" and response.id.startswith("cmpl-")
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(PROMPTS[1]), 12)
    assert response.usage.total_tokens == len(PROMPTS[1]) + 12


def test_completions_take_several_prompts_and_token_ids(client, server, expected):
    response = _complete(client, "tiny@alpha", PROMPTS)
    assert [c.text for c in response.choices] == [expected["alpha", i] for i in range(3)]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.prompt_tokens == sum(len(p) for p in PROMPTS)
    ids = server[0].generator.encode(PROMPTS[0])
    assert _complete(client, "tiny@alpha", ids).choices[0].text == expected["alpha", 0]


def test_chat_greedy_equals_generate(client, expected):
    for model, adapter in [("tiny", None), ("tiny@alpha", "alpha")]:
        response = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
        [choice] = response.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == expected[adapter, "chat"]["content"]
        assert choice.message.tool_calls is None
        assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
        assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 40
    parts = [QUESTION[0], {"role": "user", "content": [{"type": "text", "text": QUESTION[1]["content"]}]}]
    response = client.chat.completions.create(model="tiny", messages=parts, max_tokens=12, temperature=0)
    assert response.choices[0].message.content == expected[None, "chat"]["content"]  # text parts = the string


# ---- streaming ----

def test_streamed_completion_adds_up_to_the_whole(client, expected):
    chunks = list(_complete(client, "tiny@beta", PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected["beta", 1]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert len(chunks) > 3  # it really streamed, token by token
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_streamed_chat_adds_up_to_the_whole(client, expected):
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected[None, "chat"]["content"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ---- tools ----

class _Scripted(torch.nn.Module):
    """The model with its next-token logits replaced by a one-hot of ``script``: the reply is known."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.script, self.calls = model, list(script), 0

    def forward(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)  # (b, 1, vocab)
        if self.calls < len(self.script):
            logits = torch.full_like(logits, -1e4)
            logits[..., self.script[self.calls]] = 0.0
        self.calls += 1
        return logits


def test_tool_calls_are_parsed_in_replies_and_streams(client, server):
    service = server[0]
    generator = service.generator
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    script = generator.tokenizer(reply, add_special_tokens=False)["input_ids"]
    model = generator.model
    try:
        generator.model = _Scripted(model, script)
        response = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=100,
                                                  temperature=0)
        [choice] = response.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
            "function", "get_weather", {"city": "Paris"})
        assert call.id.startswith("call_")

        generator.model = _Scripted(model, script)
        chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=100,
                                                     temperature=0, stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
            (0, "get_weather", {"city": "Paris"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        generator.model = _Scripted(model, script)  # tool_choice="none": the call stays text
        plain = client.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=100,
                                               temperature=0, tool_choice="none")
        assert plain.choices[0].message.tool_calls is None
        assert plain.choices[0].message.content.startswith("<tool_call>")
    finally:
        generator.model = model


# ---- sampling controls ----

def test_n_seed_and_stop(client, expected):
    sampled = _complete(client, "tiny@alpha", PROMPTS[1], n=3, temperature=1.0, seed=5)
    texts = [c.text for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len(set(texts)) == 3  # choices use seed, seed+1, ..
    again = _complete(client, "tiny@alpha", PROMPTS[1], n=3, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == texts  # the same seed gives the same samples
    other = _complete(client, "tiny@alpha", PROMPTS[1], n=3, temperature=1.0, seed=6)
    assert [c.text for c in other.choices] != texts
    assert sampled.usage.completion_tokens == 3 * 12 and sampled.usage.prompt_tokens == len(PROMPTS[1])
    greedy = _complete(client, "tiny", PROMPTS[0], n=2)
    assert [c.text for c in greedy.choices] == [expected[None, 0]] * 2
    full = expected[None, 0]
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    cut = _complete(client, "tiny", PROMPTS[0], stop=["never there", stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = _complete(client, "tiny", PROMPTS[0], stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


# ---- concurrency ----

def test_concurrent_requests_decode_in_one_batch_with_sequential_results(client, server, expected):
    service = server[0]
    jobs = [("tiny", None, 0), ("tiny@alpha", "alpha", 1), ("tiny@beta", "beta", 2), ("tiny@alpha", "alpha", 0),
            ("tiny", None, 2), ("tiny@beta", "beta", 1)]
    service.scheduler.peak_rows = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        with service.scheduler.lock:  # hold the model's thread until every request is queued
            futures = [pool.submit(_complete, client, model, PROMPTS[i]) for model, _, i in jobs]
            deadline = time.monotonic() + 20
            while service.scheduler.pending < len(jobs):
                assert time.monotonic() < deadline, "requests did not arrive"
                time.sleep(0.01)
        texts = [future.result().choices[0].text for future in futures]
    assert service.scheduler.peak_rows == len(jobs)  # all six decoded together, three adapters in one batch
    assert texts == [expected[adapter, i] for _, adapter, i in jobs]


def test_a_request_joins_a_batch_that_is_already_decoding(client, server, expected):
    service = server[0]
    alone = _complete(client, "tiny", PROMPTS[2], max_tokens=120).choices[0]
    assert alone.finish_reason == "length"  # no early EOS: the second request joins well before the end
    service.scheduler.peak_rows = 0
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_complete, client, "tiny", PROMPTS[2], max_tokens=120)
        deadline = time.monotonic() + 20
        while not any(len(row.generated) >= 5 for row in service.scheduler.decoding):
            assert time.monotonic() < deadline and not first.done(), "the first request did not start decoding"
            time.sleep(0.001)
        with service.scheduler.lock:  # between two steps of the first request
            assert not first.done()
            second = pool.submit(_complete, client, "tiny@beta", PROMPTS[1])  # a longer prompt: the cache shifts
            while service.scheduler.pending < 1:
                assert time.monotonic() < deadline, "the second request did not arrive"
                time.sleep(0.001)
        assert second.result().choices[0].text == expected["beta", 1]
        assert first.result().choices[0].text == alone.text
    assert service.scheduler.peak_rows == 2


# ---- adapters at runtime ----

def test_adapters_added_at_runtime(client, server, files, expected):
    root, paths = files
    shutil.copytree(paths["alpha"], root / "adapters" / "gamma")  # dropped in while the server runs
    assert "tiny@gamma" in [m.id for m in client.models.list().data]
    assert _complete(client, "tiny@gamma", PROMPTS[0]).choices[0].text == expected["alpha", 0]

    http = httpx.Client(base_url=server[1], headers={"Authorization": f"Bearer {KEY}"})
    loaded = http.post("/load_lora_adapter", json={"lora_name": "spare", "lora_path": str(root / "spare")})
    assert loaded.status_code == 200 and loaded.json()["model"] == "tiny@spare" and loaded.json()["rank"] == 4
    assert _complete(client, "tiny@spare", PROMPTS[0]).choices[0].text == expected["spare", 0]
    again = http.post("/load_lora_adapter", json={"lora_name": "spare", "lora_path": str(root / "spare")})
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]
    assert http.post("/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "tiny@spare", PROMPTS[0])
    missing = http.post("/load_lora_adapter", json={"lora_name": "nope", "lora_path": str(root / "missing")})
    assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]


# ---- errors ----

def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_are_openai_shaped_with_the_right_status(client, server):
    with pytest.raises(openai.NotFoundError) as unknown:
        _complete(client, "tiny@nothing", "hi")
    assert unknown.value.code == "model_not_found" and "tiny@alpha" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        _complete(client, "tiny", "a" * 2048)  # the tiny model's context is 2048 tokens
    assert too_long.value.code == "context_length_exceeded" and "2048 tokens" in too_long.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens=129 is above this server's limit of 128"):
        _complete(client, "tiny", "hi", max_tokens=129)
    with pytest.raises(openai.BadRequestError, match="max_lora_rank=16"):
        _complete(client, "tiny@wide", "hi")
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="tiny", messages=[{"content": "no role"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="must be a string, a list of text parts"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": 5}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        _complete(client, "tiny", "hi", logprobs=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1], api_key="wrong", max_retries=0).models.list()

    http = httpx.Client(base_url=server[1], headers={"Authorization": f"Bearer {KEY}"})
    assert _error(httpx.get(f"{server[1]}/models"), 401)["code"] == "invalid_api_key"  # no key at all
    bad_json = http.post("/completions", content=b'{"model": "tiny", "prompt": ', headers={
        "Content-Type": "application/json"})
    assert "not valid JSON" in _error(bad_json, 400)["message"]
    assert "prompt" in _error(http.post("/completions", json={"model": "tiny"}), 400)["message"]
    assert _error(http.post("/completions", json={"model": "tiny", "prompt": "hi", "temperature": "hot"}),
                  400)["param"] == "temperature"
    assert "empty" in _error(http.post("/completions", json={"model": "tiny", "prompt": ""}), 400)["message"]
    assert _error(http.post("/completions", json={"model": "tiny", "prompt": [999]}), 400)["param"] == "prompt"
    assert _error(http.post("/completions", json={"model": "tiny", "prompt": "x" * 70000}), 413)["code"] == \
        "request_too_large"
    assert _error(http.get("/nothing"), 404)["type"] == "invalid_request_error"
    assert httpx.get(server[1].replace("/v1", "/health")).json() == {"status": "ok"}  # no key needed


def test_an_unknown_chat_role_is_refused_before_any_generation(client, server, monkeypatch):
    """OpenAI answers 400 naming the role; a chat template would render it as text and generate to the limit."""
    from nemo_customizer.data.chat_rows import ROLES

    service, _ = server
    submitted = []
    submit = service.scheduler.submit
    monkeypatch.setattr(service.scheduler, "submit", lambda job: (submitted.append(job), submit(job)))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=[QUESTION[0], {"role": "wizard", "content": "hi"}],
                                           max_tokens=128, stream=stream)
        error = refused.value
        assert error.code == "invalid_value" and error.param == "messages[1].role"
        assert "messages[1].role" in error.message and "'wizard'" in error.message
        assert all(repr(role) in error.message for role in ROLES)
    assert submitted == []
    client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)  # the same route still serves
    assert len(submitted) == 1


# ---- command line and config (no server) ----

def test_stream_holds_back_what_may_become_a_stop_string():
    from nemo_customizer.inference.sampling import stop_prefix_length

    assert stop_prefix_length("Answer: ye", ["yes!", "\n"]) == 2
    assert stop_prefix_length("Answer: y", ["no", "Answer"]) == 0
    assert stop_prefix_length("abc", []) == 0 and stop_prefix_length("ab", ["abc", "b"]) == 2


def test_serve_command_takes_server_settings_without_prefix(monkeypatch):
    import nemo_customizer.serving as serving

    seen = []
    monkeypatch.setattr(serving, "serve", seen.append)
    assert cli.main(["serve", "model=tiny-llama-test", "adapters_dir=/adapters", "port=9001",
                     "serving.max_lora_rank=32"]) == 0
    [cfg] = seen
    assert (cfg.serving.adapters_dir, cfg.serving.port, cfg.serving.max_lora_rank) == ("/adapters", 9001, 32)
    assert cfg.serving.host == "127.0.0.1"  # loopback unless asked otherwise
    assert cli.main(["serve", "model=tiny-llama-test", "port=0"]) == 2
    assert cli.main(["serve", "model=tiny-llama-test", "serving.max_lora_rnk=8"]) == 2
    with pytest.raises(ConfigError, match="must not contain '@'"):
        from nemo_customizer.config import validate_serving

        validate_serving(compose_config(["serving.model_name=a@b"]).serving)
