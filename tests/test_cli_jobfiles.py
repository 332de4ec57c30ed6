"""Job files of one's own (--config-path/--config-name, customize(config="job.yaml")), model YAMLs outside the
package (--config-dir, a model/ folder beside the job), --cfg checking as the run checks, -m sweeps, --help."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from nemo_customizer import cli
from nemo_customizer.config import ConfigError, compose_config, config_from_kwargs, config_search

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nemo_customizer", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def job_dir(tmp_path):
    """A job file selecting a shipped model and a model YAML of the user's own beside it (in model/)."""
    _write(tmp_path / "jobs" / "my_job.yaml", """\
        defaults:
          - model: llama-3.2-1b-instruct
          - _self_
        model:
          checkpoint: /ckpt/llama
          max_seq_length: 1024
        dataset:
          path: data/
        hyperparameters:
          epochs: 2
          lora:
            adapter_dim: 16
        output_dir: outputs/my-job
        """)
    _write(tmp_path / "jobs" / "model" / "short-llama.yaml", """\
        # a shipped model config, shortened: Hydra's defaults list extends it
        defaults:
          - llama-3.2-1b-instruct
          - _self_
        name: short-llama
        max_seq_length: 256
        """)
    return tmp_path / "jobs"


def test_job_file_composes_over_the_shipped_config_and_overrides_apply_on_top(job_dir):
    search = config_search(job_dir / "my_job.yaml")
    cfg = compose_config(["hyperparameters.epochs=3", "hyperparameters.learning_rate=3e-4"], search=search)
    assert cfg.model.name == "llama-3.2-1b-instruct"
    assert cfg.model.architecture.rope_scaling.factor == 32.0  # from the shipped model YAML
    assert (cfg.model.checkpoint, cfg.model.max_seq_length) == ("/ckpt/llama", 1024)  # the job's, over the model's
    assert (cfg.dataset.path, cfg.output_dir, cfg.hyperparameters.lora.adapter_dim) == ("data/", "outputs/my-job", 16)
    assert cfg.hyperparameters.epochs == 3  # the override, over the job
    assert cfg.hyperparameters.learning_rate == pytest.approx(3e-4)
    assert compose_config(["model=short-llama"], search=search).model.max_seq_length == 1024  # job still on top


@pytest.mark.parametrize("defaults, model", [
    ("defaults:\n  - override model: tiny-llama-test\n  - _self_\n", "tiny-llama-test"),  # Hydra's other spelling
    ("", "smollm2-135m-instruct"),  # no defaults list: the shipped default model
])
def test_job_file_model_selection_spellings(tmp_path, defaults, model):
    job = _write(tmp_path / "job.yaml", defaults + "hyperparameters:\n  epochs: 4\n")
    cfg = compose_config([], search=config_search(job))
    assert (cfg.model.name, cfg.hyperparameters.epochs) == (model, 4)


def test_model_yaml_of_ones_own_beside_the_job_or_in_a_config_dir(job_dir, tmp_path):
    beside = compose_config(["model=short-llama"], search=config_search(job_dir / "my_job.yaml"))
    assert (beside.model.name, beside.model.architecture.hidden_size) == ("short-llama", 2048)
    in_dir = compose_config(["model=short-llama"], search=config_search(config_dirs=[job_dir]))
    assert (in_dir.model.name, in_dir.model.max_seq_length) == ("short-llama", 256)
    with pytest.raises(ConfigError, match="unknown model 'short-llama'"):
        compose_config(["model=short-llama"])  # not on the search path without the folder


def test_configs_lists_model_yamls_of_ones_own_with_their_folder(job_dir, capsys):
    from nemo_customizer import configs

    rows = {row["name"]: row for row in configs(config_dir=job_dir)}
    assert rows["short-llama"]["max_seq_length"] == 256 and rows["short-llama"]["config_dir"] == str(job_dir)
    assert "config_dir" not in rows["llama-3.2-1b-instruct"]  # shipped
    assert "short-llama" not in [row["name"] for row in configs()]
    for args in (["configs", "--config-dir", str(job_dir)], ["--config-dir", str(job_dir), "configs"],
                 ["configs", "--config-path", str(job_dir)]):
        assert cli.main([*args, "--json"]) == 0
        listed = {row["name"]: row.get("config_dir") for row in json.loads(capsys.readouterr().out)}
        assert listed["short-llama"] == str(job_dir) and listed["qwen3-0.6b"] is None, args
    assert cli.main(["-cd", str(job_dir), "configs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "from"
    assert [line.split()[-1] for line in table if line.startswith(("short-llama ", "qwen3-0.6b "))] == [
        "shipped", str(job_dir)]
    assert cli.main(["configs", "--config-dir", str(job_dir / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_yaml_of_ones_own_is_validated_like_a_shipped_one(tmp_path):
    _write(tmp_path / "model" / "typo.yaml", """\
        defaults: [tiny-llama-test, _self_]
        name: typo
        architecture:
          hiden_size: 32
        """)
    with pytest.raises(ConfigError) as info:
        compose_config(["model=typo"], search=config_search(config_dirs=[tmp_path]))
    message = str(info.value)
    assert "'model.architecture.hiden_size'" in message and "did you mean 'hidden_size'" in message
    assert str(tmp_path / "model" / "typo.yaml") in message
    with pytest.raises(ConfigError) as info:
        compose_config(["model=typ"], search=config_search(config_dirs=[tmp_path]))
    assert "did you mean 'typo'" in str(info.value) and "smollm2-135m-instruct" in str(info.value)


@pytest.mark.parametrize("body, words", [
    ("hyperparameters:\n  epoch: 2\n", ["'hyperparameters.epoch'", "did you mean 'epochs'", "bad.yaml"]),
    ("defaults:\n  - model: llama-3.2-1b\n", ["unknown model 'llama-3.2-1b'", "llama-3.2-1b-instruct"]),
    ("- a list\n", ["must be a mapping"]),
])
def test_job_file_mistakes(tmp_path, body, words):
    job = _write(tmp_path / "bad.yaml", body)
    with pytest.raises(ConfigError) as info:
        compose_config([], search=config_search(job))
    for word in words:
        assert word in str(info.value)


def test_missing_job_file_and_config_dir(tmp_path):
    with pytest.raises(ConfigError, match="job file .*nope.yaml does not exist"):
        config_search(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config directory .* does not exist"):
        config_search(config_dirs=[tmp_path / "nope"])


def test_the_example_job_and_model_compose_and_pass_the_checks():
    from nemo_customizer.config import validate_config

    search = config_search(REPO / "examples" / "my_job.yaml")
    for overrides, model, length in (([], "smollm2-135m-instruct", 2048), (["model=smollm2-512"], "smollm2-512", 512)):
        cfg = compose_config(overrides, search=search)
        validate_config(cfg)
        assert (cfg.model.name, cfg.model.max_seq_length, cfg.dataset.path) == (model, length, "data/")
        assert cfg.hyperparameters.learning_rate == pytest.approx(1e-4)


def test_customize_config_path_composes_like_the_command_line(job_dir):
    from_python = config_from_kwargs(config=str(job_dir / "my_job.yaml"), hyperparameters={"epochs": 3},
                                     device="cpu")
    from_cli = compose_config(["hyperparameters.epochs=3", "device=cpu"],
                              search=config_search(job_dir / "my_job.yaml"))
    assert from_python == from_cli
    assert config_from_kwargs(config=job_dir / "my_job.yaml") == compose_config(
        [], search=config_search(job_dir / "my_job.yaml"))


def test_cfg_job_prints_the_job_file(job_dir):
    printed = _run("--config-path", str(job_dir), "--config-name", "my_job", "--cfg", "job",
                   "hyperparameters.epochs=5")
    assert printed.returncode == 0, printed.stderr
    cfg = yaml.safe_load(printed.stdout)
    assert (cfg["model"]["name"], cfg["model"]["max_seq_length"], cfg["hyperparameters"]["epochs"]) == \
        ("llama-3.2-1b-instruct", 1024, 5)


@pytest.mark.parametrize("args, word", [
    (["hyperparameters.learning_rate=-1"], "hyperparameters.learning_rate"),  # validate_config refuses it
    (["dataset.path=???"], "dataset.path is required"),
    # only the run's own first checks refuse these: CUDA graphs on a CPU run, TP=2 in one process
    (["device=cpu", "hyperparameters.cuda_graphs=true", "hyperparameters.sequence_packing_enabled=true",
      "precision=bf16"], "needs a CUDA device"),
    (["model.tensor_parallel_size=2"], "1 processes cannot be split"),
])
def test_cfg_refuses_what_the_run_refuses(job_dir, capsys, args, word):
    for cfg_flag in (["--cfg"], ["--cfg", "job"], ["-c"]):
        assert cli.main(["-cp", str(job_dir), "-cn", "my_job", *cfg_flag, *args]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], err


def test_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0
    listed = result.stdout.split("commands")[-1]
    for name in cli._COMMANDS:
        assert f"\n  {name} " in listed, name
    for option in ("--config-path", "--config-name", "--config-dir", "--cfg", "--multirun", "OVERRIDE"):
        assert option in result.stdout


@pytest.mark.parametrize("args, words", [
    (["hyperparameters.learning_rate=1e-4,3e-4"], ["gives several values", "-m (--multirun)"]),
    (["-m", "output_dir=a,b"], ["output_dir cannot be swept"]),
    (["-m", "model=tiny-llama-test", "dataset.path=d", "hyperparameters.learning_rate=1e-3,-1"],
     ["sweep job 1 (hyperparameters.learning_rate=-1)", "must be greater than 0"]),
    (["-m", "model=tiny-llama-test,gpt-5", "dataset.path=d"], ["sweep job 1 (model=gpt-5)", "unknown model"]),
    (["--cfg", "hydra"], ["--cfg job"]),
    (["--config-path", "jobs"], ["needs --config-name"]),
])
def test_sweep_and_option_mistakes_exit_2_before_anything_runs(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and not any(tmp_path.iterdir())  # no job directory, no table
    for word in words:
        assert word in err


# -- sweeps on the tiny model --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_job(tmp_path_factory, model_dir):
    from _tiny import write_classification_data

    root = tmp_path_factory.mktemp("sweep")
    write_classification_data(root / "data", n_train=16, n_val=8)
    return _write(root / "tiny_job.yaml", f"""\
        defaults:
          - model: tiny-llama-test
          - _self_
        model:
          checkpoint: {model_dir}
          random_weights: false
        dataset:
          path: {root / 'data'}
        hyperparameters:
          epochs: 1
          batch_size: 8
          micro_batch_size: 8
          max_steps: 2
        output_dir: {root / 'sweep'}
        device: cpu
        progress_bar: false
        """)


def test_multirun_runs_each_combination_in_its_own_job_dir_then_prints_the_table(sweep_job, capsys):
    args = ["--config-path", str(sweep_job.parent), "--config-name", "tiny_job", "-m",
            "hyperparameters.learning_rate=1e-3,5e-3", "hyperparameters.lora.adapter_dim=choice(4)"]  # 2 × 1
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    sweep = sweep_job.parent / "sweep"
    jobs = [sweep / "0_learning_rate=0.001,adapter_dim=4", sweep / "1_learning_rate=0.005,adapter_dim=4"]
    results = [json.loads((job / "result.json").read_text()) for job in jobs]
    assert [r["steps"] for r in results] == [2, 2]
    for job, lr in zip(jobs, (1e-3, 5e-3)):
        saved = yaml.safe_load((job / "config.yaml").read_text())
        assert saved["hyperparameters"]["learning_rate"] == pytest.approx(lr)
        assert saved["hyperparameters"]["lora"]["adapter_dim"] == 4
        assert saved["output_dir"] == str(job)
    table = out.splitlines()
    assert table[0].split() == ["job", "hyperparameters.learning_rate", "hyperparameters.lora.adapter_dim",
                                "status", "best_val_loss", "best_step"]
    for line, result, lr in zip(table[1:3], results, ("0.001", "0.005")):
        assert line.split() == [line.split()[0], lr, "4", "completed", f"{result['best_val_loss']:.4f}",
                                str(result["best_step"])]
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [(r["job_dir"], r["status"]) for r in rows] == [(str(j), "completed") for j in jobs]
    assert [float(r["best_val_loss"]) for r in rows] == [r["best_val_loss"] for r in results]

    # the same command again: finished jobs are listed from their result.json, not trained again
    mtimes = [(job / "result.json").stat().st_mtime_ns for job in jobs]
    assert cli.main(args) == 0
    assert "finished earlier" in capsys.readouterr().err
    assert [(job / "result.json").stat().st_mtime_ns for job in jobs] == mtimes


def test_a_failed_sweep_job_is_in_the_table_and_the_sweep_goes_on(sweep_job, tmp_path, capsys):
    missing = [tmp_path / "no_data_a", tmp_path / "no_data_b"]
    code = cli.main(["--config-path", str(sweep_job.parent), "--config-name", "tiny_job", "-m",
                     f"output_dir={tmp_path / 'failing'}", f"dataset.path={missing[0]},{missing[1]}"])
    out = capsys.readouterr().out
    assert code == 1
    rows = list(csv.DictReader((tmp_path / "failing" / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"]  # the second ran after the first failed
    assert all("DatasetError" in r["error"] and "no such file" in r["error"] for r in rows)
    assert "job 0 failed: DatasetError" in out and "job 1 failed: DatasetError" in out


def test_customize_trains_a_job_file(sweep_job, tmp_path):
    from nemo_customizer import customize

    result = customize(config=str(sweep_job), output_dir=str(tmp_path / "job"), hyperparameters={"max_steps": 1})
    assert (result.job_dir, result.steps) == (str(tmp_path / "job"), 1)
    saved = yaml.safe_load((tmp_path / "job" / "config.yaml").read_text())
    assert (saved["model"]["name"], saved["hyperparameters"]["batch_size"]) == ("tiny-llama-test", 8)
