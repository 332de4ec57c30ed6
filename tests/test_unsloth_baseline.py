"""The Unsloth baseline of ``scripts/benchmark.py``: its script refuses clearly where it cannot run (no CUDA GPU, no
importable Unsloth), and ``--baseline unsloth`` runs that script instead of the transformers+peft one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _scripts import SCRIPTS, load_script


def _load(name: str):
    return load_script(name)


def test_without_a_cuda_gpu_the_script_exits_2_and_says_why():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    done = subprocess.run([sys.executable, str(SCRIPTS / "unsloth_throughput.py"), "--model", "llama-3.2-1b-instruct",
                           "--targets", "q_proj,v_proj", "--seq", "128", "--rows", "2"],
                          capture_output=True, text=True, cwd=SCRIPTS.parent, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "needs a CUDA GPU" in done.stderr
    assert done.stdout == ""


def test_an_unsloth_that_does_not_import_exits_2_and_names_the_error(monkeypatch, capsys):
    script = _load("unsloth_throughput")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` raises ImportError
    assert script.main(["--model", "llama-3.2-1b-instruct", "--full"]) == 2
    assert "Unsloth does not import here (ModuleNotFoundError" in capsys.readouterr().err


def test_benchmark_runs_the_unsloth_script_for_the_unsloth_baseline(monkeypatch):
    benchmark = _load("benchmark")
    assert benchmark.BASELINES["unsloth"][0] == "unsloth"
    ran = {}

    def fake_run(command, **kwargs):
        ran["command"] = command
        line = json.dumps(dict(tokens_per_s=1000.0, step_ms=4096.0, peak_gib=1.5))
        return subprocess.CompletedProcess(command, 0, stdout=f"Unsloth banner\n{line}\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    row = benchmark.run_baseline("llama-3.2-1b-instruct", "lora-qv", 4096, 1, "unsloth")
    assert Path(ran["command"][1]).name == "unsloth_throughput.py"
    assert "--kernels" not in ran["command"]
    assert ran["command"][ran["command"].index("--targets") + 1] == "q_proj,v_proj"
    assert (row["impl"], row["tok_s"], row["peak_gb"]) == ("unsloth", 1000, 1.5)


def test_benchmark_reports_an_unavailable_unsloth_instead_of_failing(monkeypatch):
    benchmark = _load("benchmark")
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 2, stdout="", stderr="error: Unsloth does not import here (ImportError: no module)\n"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    row = benchmark.run_baseline("llama-3.2-1b-instruct", "full", 4096, 1, "unsloth")
    assert row["error"].startswith("unavailable: error: Unsloth does not import here")


def test_benchmark_accepts_unsloth_in_the_baseline_list_and_refuses_unknown_names(capsys):
    benchmark = _load("benchmark")
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--baseline", "hf-peft,unsloth,axolotl"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--baseline axolotl: unknown" in err and "unsloth" in err
    if not torch.cuda.is_available():  # the names pass; then the missing GPU stops the run
        assert benchmark.main(["--baseline", "hf-peft,liger,unsloth", "--equal-work"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
