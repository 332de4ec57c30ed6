"""``python -m nemo_customizer datasets upload|list|show|delete``: prints the library's results, errors exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny import write_classification_data
from nemo_customizer import cli

REPO = Path(__file__).resolve().parents[1]



def model_overrides(model_dir: Path, max_seq_length: int = 128) -> list[str]:
    return ["--model", "tiny-llama-test", f"model.checkpoint={model_dir}", "model.random_weights=false",
            f"model.max_seq_length={max_seq_length}"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nemo_customizer", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_upload_show_list_delete(model_dir, tmp_path, capsys):
    data = write_classification_data(tmp_path / "data", n_train=24, n_val=6)
    store = str(tmp_path / "store")
    # `python -m nemo_customizer` end to end; options and overrides in any order, as for the other commands.
    uploaded = _run("datasets", "upload", str(data), f"model.checkpoint={model_dir}", "--name", "cls",
                    "--store", store, "--model", "tiny-llama-test", "model.random_weights=false",
                    "model.max_seq_length=20")
    assert uploaded.returncode == 0, uploaded.stderr
    lines = uploaded.stdout.splitlines()
    assert lines[0] == "dataset 'cls': prompt_completion, 24 training rows, 6 validation rows"
    assert "at max_seq_length=20:" in lines
    assert (tmp_path / "store" / "cls" / "training.jsonl").read_bytes() == (data / "training.jsonl").read_bytes()

    shown = _run("datasets", "show", "cls", "--store", store)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == uploaded.stdout

    assert cli.main(["datasets", "list", "--store", store]) == 0
    header, entry = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "format", "training", "validation", "created", "source"]
    assert entry.split()[:4] == ["cls", "prompt_completion", "24", "6"] and entry.endswith(str(data))

    assert cli.main(["datasets", "delete", "cls", "--store", store]) == 0
    assert capsys.readouterr().out.strip() == f"deleted dataset 'cls' ({tmp_path / 'store' / 'cls'})"
    assert cli.main(["datasets", "list", "--store", store]) == 0
    assert capsys.readouterr().out.strip() == f"no datasets in {store}"


def test_store_comes_from_the_environment(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEMO_CUSTOMIZER_DATASETS", str(tmp_path / "env-store"))
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert cli.main(["datasets", "upload", str(path), "--name", "t", *model_overrides(model_dir)]) == 0
    assert (tmp_path / "env-store" / "t" / "dataset.json").is_file()
    capsys.readouterr()
    assert cli.main(["datasets", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["t", "prompt_completion", "1", "0"]


def test_upload_and_show_preference_pairs(model_dir, tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
         "preferred_output": [{"role": "assistant", "content": "4"}]},
    ]))
    store = ["--store", str(tmp_path / "store")]
    assert cli.main(["datasets", "upload", str(path), "--name", "p", *store, *model_overrides(model_dir)]) == 2
    assert f'{path}:2: field "non_preferred_output" is missing' in _error_line(capsys)

    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "2+2?", "chosen_response": "4", "rejected_response": "5"},
    ]))
    assert cli.main(["datasets", "upload", str(path), "--name", "p", *store, *model_overrides(model_dir)]) == 0
    uploaded = capsys.readouterr().out
    assert uploaded.splitlines()[0] == "dataset 'p': preference, 2 training pairs, 0 validation pairs"
    assert "  prompt    min 4, median 4, p95 18, max 18" in uploaded.splitlines()
    assert cli.main(["datasets", "show", "p", *store]) == 0
    assert capsys.readouterr().out == uploaded
    assert cli.main(["datasets", "list", *store]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["p", "preference", "2", "0"]


def _error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_errors_print_one_line_and_exit_2(model_dir, tmp_path, capsys):
    store = ["--store", str(tmp_path / "store")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert cli.main(["datasets", "upload", str(bad), "--name", "x", *store, *model_overrides(model_dir)]) == 2
    assert f'{bad}:2: field "completion" is missing' in _error_line(capsys)
    assert not (tmp_path / "store").exists() or list((tmp_path / "store").iterdir()) == []

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n')
    assert cli.main(["datasets", "upload", str(good), "--name", "x", *store, *model_overrides(model_dir)]) == 0
    capsys.readouterr()
    assert cli.main(["datasets", "upload", str(good), "--name", "x", *store, *model_overrides(model_dir)]) == 2
    assert "'x' already exists" in _error_line(capsys)
    assert cli.main(["datasets", "upload", str(good), "--name", "x", "--overwrite", *store,
                     *model_overrides(model_dir)]) == 0
    capsys.readouterr()

    assert cli.main(["datasets", "upload", str(good), "--name", "../x", *store, *model_overrides(model_dir)]) == 2
    assert "invalid dataset name '../x'" in _error_line(capsys)
    assert cli.main(["datasets", "show", "nope", *store]) == 2
    assert "no stored dataset named 'nope'" in (line := _error_line(capsys)) and "stored: x" in line
    assert cli.main(["datasets", "delete", "nope", *store]) == 2
    assert "no stored dataset named 'nope'" in _error_line(capsys)
    assert cli.main(["datasets", "upload", str(good), "--name", "y", *store, "--model", "gpt-5"]) == 2
    assert "unknown model 'gpt-5'" in _error_line(capsys)


@pytest.mark.parametrize("command, options", [
    (["datasets"], ["upload", "list", "show", "delete", "NEMO_CUSTOMIZER_DATASETS"]),
    (["datasets", "upload"], ["--name", "--model", "--overwrite", "--store", "OVERRIDE"]),
    (["datasets", "list"], ["--store"]),
    (["datasets", "show"], ["NAME", "--store"]),
    (["datasets", "delete"], ["NAME", "--store"]),
])
def test_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["datasets", "upload-all"])
    assert exit_.value.code == 2
    assert "invalid choice: 'upload-all'" in capsys.readouterr().err


def test_upload_help_names_every_kind_of_data_it_reads(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["datasets", "upload", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for kind in ("JSONL", "JSON,", "CSV/TSV", "Parquet", "Arrow", "save_to_disk folder", "Hub dataset ID"):
        assert kind in text, kind
    assert "a JSONL file or a directory" not in text
