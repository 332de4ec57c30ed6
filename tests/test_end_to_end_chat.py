"""End to end on SmolLM2: real chitchat conversations (packed) and a tool-calling dataset train, then chat works."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def _tool_rows(n: int):
    cities = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Delhi"]
    for i in range(n):
        city = cities[i % len(cities)]
        arguments = {"city": city} if i % 2 else json.dumps({"city": city})  # objects and JSON strings both occur
        yield {"tools": [WEATHER], "messages": [
            {"role": "user", "content": f"What's the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{10 + i} C and clear"},
            {"role": "assistant", "content": f"It is {10 + i} C and clear in {city}."}]}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                    reason="pip install --no-deps chitchat-dataset==0.9.0")
def test_chitchat_conversations_train_packed(tmp_path):
    from nemo_customizer import customize

    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_chitchat.py"), "--output-dir",
                    str(tmp_path / "data"), "--train", "48", "--validation", "8"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # the script imports nemo_customizer
    result = customize("smollm2-135m-instruct", dataset=str(tmp_path / "data"), output_dir=str(tmp_path / "job"),
                       progress_bar=False, model={"max_seq_length": 512},
                       hyperparameters={"epochs": 1, "batch_size": 16, "micro_batch_size": 8, "max_steps": 2,
                                        "learning_rate": 1e-4, "sequence_packing_enabled": True})
    assert result.steps == 2
    events = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines()]
    packing = [e for e in events if e["event"] == "packing"]
    assert packing and packing[0]["packing_factor"] > 1
    assert all(e["loss"] == e["loss"] for e in events if e["event"] == "train")  # finite, not NaN


@pytest.mark.slow
def test_tool_calling_dataset_trains_and_chat_offers_tools(tmp_path):
    from nemo_customizer import customize
    from nemo_customizer.config import compose_config
    from nemo_customizer.inference import Generator

    data = tmp_path / "data"
    data.mkdir()
    rows = list(_tool_rows(40))
    (data / "training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    # SmolLM2's own ChatML template has no tool syntax; the shipped chatml-tools template adds Hermes-style calls.
    result = customize("smollm2-135m-instruct", dataset=str(data), output_dir=str(tmp_path / "job"),
                       progress_bar=False, model={"chat_template": "chatml-tools"},
                       hyperparameters={"epochs": 1, "batch_size": 16, "micro_batch_size": 8, "max_steps": 2,
                                        "learning_rate": 1e-3})
    assert result.steps == 2 and result.final_val_loss == result.final_val_loss

    cfg = compose_config(["model=smollm2-135m-instruct", "model.chat_template=chatml-tools"])
    with Generator.from_config(cfg, adapter=result.adapter_path) as generator:
        reply = generator.chat([{"role": "user", "content": "What's the weather in Oslo?"}], tools=[WEATHER],
                               max_tokens=32)
    assert reply.message["role"] == "assistant"
    assert reply.finish_reason in ("stop", "length", "tool_calls")
    for call in reply.message.get("tool_calls", []):
        json.loads(call["function"]["arguments"])  # arguments come back as a JSON string, as OpenAI returns them

    # held-out conversations that end in the assistant's tool call: tool-call metrics from the job's adapter
    from nemo_customizer import evaluate
    from nemo_customizer.evaluation.metrics import function_name_accuracy, tool_call_exact_match

    heldout = tmp_path / "tool_calls.jsonl"
    heldout.write_text("".join(json.dumps({"tools": r["tools"], "messages": r["messages"][:2]}) + "\n"
                               for r in rows[32:]))
    report = evaluate(str(heldout), job_dir=str(tmp_path / "job"), max_tokens=48, progress=False)
    assert report.format == "chat" and report.rows == 8
    assert report.metrics == ("exact_match", "loss", "perplexity", "tool_call_exact_match", "function_name_accuracy")
    references = [r["messages"][1]["tool_calls"] for r in rows[32:]]
    calls = report.customized.predicted_calls
    assert report.customized.metrics["tool_call_exact_match"] == tool_call_exact_match(calls, references)
    assert report.customized.metrics["function_name_accuracy"] == function_name_accuracy(calls, references)
    assert json.loads((tmp_path / "job" / "status.json").read_text())["evaluation"] == report.summary()


def test_chat_template_setting_takes_a_shipped_name_a_path_or_jinja_text(tmp_path):
    from nemo_customizer.checkpoints.resolve import read_chat_template
    from nemo_customizer.config import ConfigError

    shipped = read_chat_template("chatml-tools")
    assert "<tool_call>" in shipped and "{%- if tools %}" in shipped
    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(str(path)) == "{{ messages[0]['content'] }}"
    assert read_chat_template("{{ bos_token }}{{ messages }}") == "{{ bos_token }}{{ messages }}"
    with pytest.raises(ConfigError, match="neither a file nor a shipped template .*chatml-tools"):
        read_chat_template("chatml-toolz")
