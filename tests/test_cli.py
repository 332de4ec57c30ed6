"""The command line: configs table, --cfg, one-line config errors with exit status 2, dispatch to api/inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from nemo_customizer import cli
from nemo_customizer.config import Config

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nemo_customizer", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, input=stdin, timeout=120)


def test_configs_prints_the_table():
    result = _run("configs")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "max_seq_length"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["llama-3.2-1b-instruct"][1] == "4096"
    assert rows["smollm2-135m-instruct"][1] == "2048"
    assert rows["llama-3.3-70b-instruct"][2:5] == ["4", "yes", "yes"]
    assert "tiny-llama-test" not in rows


def test_configs_json():
    result = _run("configs", "--json")
    assert result.returncode == 0, result.stderr
    assert {row["name"] for row in json.loads(result.stdout)} >= {"llama-3.1-8b-instruct", "smollm2-135m-instruct"}


def test_cfg_prints_the_composed_config():
    result = _run("--cfg", "model=llama-3.2-1b-instruct", "hyperparameters.epochs=7", "dataset.path=d.jsonl",
                  "model.checkpoint=/ckpt")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["name"] == "llama-3.2-1b-instruct"
    assert printed["model"]["architecture"]["rope_scaling"]["factor"] == 32.0
    assert printed["hyperparameters"]["epochs"] == 7
    assert printed["dataset"]["path"] == "d.jsonl"


@pytest.mark.parametrize("args, words", [
    (["hyperparameters.lora.adaptr_dim=4"], ["'hyperparameters.lora.adaptr_dim'", "adapter_dim"]),
    (["--cfg", "model=gpt-5"], ["unknown model 'gpt-5'", "smollm2-135m-instruct"]),
    (["model=tiny-llama-test"], ["dataset.path is required"]),
    (["model=tiny-llama-test", "dataset.path=d", "hyperparameters.lora.adapter_dropout=1"], ["adapter_dropout"]),
    (["generate", "--prompt", "hi", "model.architecture.layers=2"], ["'model.architecture.layers'"]),
    (["generate", "--prompt", "hi", "--top-p", "0"], ["--top-p"]),
    (["generate", "--prompt", "hi", "model=llama-3.1-8b-instruct"], ["model.checkpoint="]),
])
def test_config_errors_exit_2_with_one_line(args, words):
    result = _run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("command, options", [
    ([], ["--cfg", "OVERRIDE", "configs", "generate"]),
    (["configs"], ["--json"]),
    (["generate"], ["--adapter", "--prompt", "--max-tokens", "--temperature", "--top-p", "--stop", "--seed"]),
])
def test_help(command, options):
    result = _run(*command, "--help")
    assert result.returncode == 0
    for option in options:
        assert option in result.stdout


def test_train_validates_then_calls_api_run(monkeypatch, capsys):
    seen = []

    class Result:
        def __repr__(self) -> str:
            return "Result(status='completed')"

    def run(cfg: Config) -> Result:
        seen.append(cfg)
        return Result()

    monkeypatch.setitem(sys.modules, "nemo_customizer.api", types.SimpleNamespace(run=run))
    code = cli.main(["model=tiny-llama-test", "dataset.path=d.jsonl", "hyperparameters.batch_size=8"])
    out, err = capsys.readouterr()
    assert code == 0
    assert isinstance(seen[0], Config) and seen[0].hyperparameters.batch_size == 8
    assert out.strip() == "Result(status='completed')"
    assert err.strip() == "warning: hyperparameters.batch_size=8 is not a multiple of 16; multiples of 16 are " \
                          "recommended."


def test_config_error_raised_inside_run_exits_2(monkeypatch, capsys):
    from nemo_customizer.config import ConfigError, check_batch_layout

    def run(cfg: Config):
        check_batch_layout(cfg.hyperparameters.batch_size, cfg.hyperparameters.micro_batch_size, 3)

    monkeypatch.setitem(sys.modules, "nemo_customizer.api", types.SimpleNamespace(run=run))
    assert cli.main(["model=tiny-llama-test", "dataset.path=d.jsonl"]) == 2
    assert "data-parallel size 3" in capsys.readouterr().err
    assert issubclass(ConfigError, ValueError)


def test_generate_calls_inference(monkeypatch, capsys):
    calls = []

    def generate(prompt, **kwargs):
        calls.append((prompt, kwargs))
        return "a completion"

    monkeypatch.setitem(sys.modules, "nemo_customizer.inference", types.SimpleNamespace(generate=generate))
    code = cli.main(["generate", "--prompt", "Hello", "--max-tokens", "5", "--stop", "\n", "--stop", "END",
                     "model=tiny-llama-test", "--adapter", "out/adapter", "hyperparameters.seed=7"])
    assert code == 0
    assert capsys.readouterr().out == "a completion\n"
    prompt, kwargs = calls[0]
    assert prompt == "Hello"
    assert kwargs["config"].model.name == "tiny-llama-test"
    assert kwargs == dict(config=kwargs["config"], adapter="out/adapter", max_tokens=5, temperature=0.0, top_p=1.0,
                          stop=["\n", "END"], seed=7)
