"""Experiment trackers against the real libraries in their offline modes: W&B offline runs (read back from the
run's ``.wandb`` transaction log) and MLflow's local file store (read back with ``MlflowClient``). A tiny job logs
its config and series to both, is cancelled, and its resumed run continues the same runs; a failed job ends them
failed; only the main rank logs; a missing package is a ConfigError before any data is read."""

from __future__ import annotations

import json
import re
import signal
import struct
import sys
from pathlib import Path

import pytest

from _tiny import write_classification_data

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

EXPERIMENT = "tracker-tests"


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """W&B reads its environment once per process (at its first run): each test starts it afresh."""
    yield
    wandb.teardown()


def _logger(root: Path, wandb_on: bool = True, mlflow_on: bool = True) -> dict:
    return {"wandb": {"enabled": wandb_on, "project": "tracker-tests"},
            "mlflow": {"enabled": mlflow_on, "tracking_uri": _mlflow_uri(root), "experiment_name": EXPERIMENT}}


def _mlflow_uri(root: Path) -> str:
    return f"file:{root / 'mlruns'}"


def _offline(monkeypatch, root: Path) -> None:
    """W&B writes offline runs under ``root/wandb_dir``; MLflow 3 accepts a ``file:`` store only when told to."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (root / "wandb_dir").mkdir(exist_ok=True)


def _customize(root: Path, model_dir: Path, name: str, logger: dict, **hyperparameters):
    from nemo_customizer.api import customize

    if not (root / "data").exists():
        write_classification_data(root / "data", n_train=32, n_val=8)
    hp = {"epochs": 2, "batch_size": 8, "micro_batch_size": 8, "val_check_interval": 2, **hyperparameters}
    return customize("tiny-llama-test", dataset=str(root / "data"), output_dir=str(root / name), progress_bar=False,
                     hyperparameters=hp, model={"checkpoint": str(model_dir), "random_weights": False},
                     logger=logger)


def _records(job: Path, event: str) -> list:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def _at_step(monkeypatch, step: int, action) -> None:
    """Call ``action()`` inside training step ``step``, after its forward/backward."""
    from nemo_customizer.training import step as step_module

    original, calls = step_module.forward_backward, [0]

    def forward_backward(model, micro_batches, device, forward_only, **kwargs):
        out = original(model, micro_batches, device, forward_only, **kwargs)
        if not forward_only:
            calls[0] += 1
            if calls[0] == step:
                action()
        return out

    monkeypatch.setattr(step_module, "forward_backward", forward_backward)


# --- reading W&B's offline runs -------------------------------------------------------------------------------------

_BLOCK, _HEADER = 32768, 7  # W&B's transaction log: LevelDB's log format behind a 7-byte file header
_FULL, _LAST = 1, 4


def _wandb_records(path: Path):
    """The ``wandb_internal_pb2.Record`` protobufs of an offline run's ``run-<id>.wandb`` file, in order.

    The file is ``:W&B`` + magic + version, then LevelDB log records in 32 KiB blocks (``<checksum u32, length
    u16, type u8>`` + data; a record that does not fit its block continues in FIRST/MIDDLE/LAST chunks; a block's
    tail shorter than a header is zero padding)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, payload = _HEADER, b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        if kind == 0:  # zero padding to the end of the block
            position += left
            continue
        payload += data[position + _HEADER:position + _HEADER + length]
        position += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def _wandb_runs(wandb_dir: Path) -> list:
    """Each offline run directory under ``wandb_dir`` (oldest first): its id, config, history rows and exit code."""
    runs = []
    for run_dir in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        run = {"dir": run_dir, "id": None, "config": {}, "history": [], "exit_code": None}
        for record in _wandb_records(next(run_dir.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            else:
                updates = ()
            for item in updates:
                run["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            if kind == "history":
                run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                       for item in record.history.item})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


# --- a job cancelled at step 3 and resumed to the end -------------------------------------------------------------

@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory, model_dir):
    """Logs to W&B and MLflow; a cancel request during step 3 stops it (exit code 143), the same command again
    resumes it from that step's checkpoint to the end. Returns (root, job dir, trackers.json after the first run)."""
    from nemo_customizer.api import JobCancelled
    from nemo_customizer.training.signals import request_cancel

    root = tmp_path_factory.mktemp("tracked")
    job = root / "job"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, root)
        with pytest.MonkeyPatch.context() as inject:
            _at_step(inject, 3, lambda: request_cancel(job))
            with pytest.raises(JobCancelled):
                _customize(root, model_dir, "job", _logger(root))
        first_ids = json.loads((job / "trackers.json").read_text())
        first_mlflow = mlflow.tracking.MlflowClient(_mlflow_uri(root)).get_run(first_ids["mlflow"])
        result = _customize(root, model_dir, "job", _logger(root))
    wandb.teardown()
    assert result.steps == 8
    return root, job, first_ids, first_mlflow.info.status


def test_mlflow_run_has_the_config_and_the_series_and_the_resumed_job_continued_it(resumed_job):
    root, job, first_ids, first_status = resumed_job
    client = mlflow.tracking.MlflowClient(_mlflow_uri(root))
    assert json.loads((job / "trackers.json").read_text())["mlflow"] == first_ids["mlflow"]
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])  # one run, continued
    assert run.info.run_id == first_ids["mlflow"] and run.info.run_name == "job"
    assert (first_status, run.info.status) == ("KILLED", "FINISHED")
    params = run.data.params
    assert params["hyperparameters.learning_rate"] == "0.0001" and params["hyperparameters.epochs"] == "2"
    assert params["model.architecture.hidden_size"] == "64" and params["logger.mlflow.enabled"] == "True"
    assert params["output_dir"] == str(job) and not [key for key in params if key.startswith("serving.")]

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                 key=lambda m: (m.step, m.timestamp))]

    train, validation = _records(job, "train"), _records(job, "validation")
    assert [r["step"] for r in train] == list(range(1, 9))  # each step once: the resume started after step 3
    for key, record_key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                            ("train/tokens_per_s", "tokens_per_s"), ("train/tokens", "tokens"),
                            ("train/epoch", "epoch")]:
        assert history(key) == [(r["step"], pytest.approx(r[record_key])) for r in train], key
    assert history("val/loss") == [(r["step"], pytest.approx(r["val_loss"])) for r in validation]
    assert [step for step, _ in history("val/loss")] == [2, 4, 6, 8]


def test_wandb_run_has_the_config_and_the_series_and_the_resumed_job_continued_it(resumed_job):
    root, job, first_ids, _ = resumed_job
    first, second = _wandb_runs(root / "wandb_dir")  # one offline directory per process, both of the same run
    assert first["id"] == second["id"] == first_ids["wandb"]
    assert json.loads((job / "trackers.json").read_text())["wandb"] == first_ids["wandb"]
    assert (first["exit_code"], second["exit_code"]) == (128 + signal.SIGTERM, 0)  # a cancel request: as SIGTERM
    config = second["config"]
    assert config["hyperparameters"]["learning_rate"] == 0.0001 and config["output_dir"] == str(job)
    assert config["model"]["architecture"]["hidden_size"] == 64 and "serving" not in config

    rows = first["history"] + second["history"]
    train, validation = _records(job, "train"), _records(job, "validation")
    logged_train = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in logged_train] == list(range(1, 9))
    for row, record in zip(logged_train, train):
        assert row["train/loss"] == pytest.approx(record["loss"]) and row["train/lr"] == pytest.approx(record["lr"])
        assert row["train/grad_norm"] == pytest.approx(record["grad_norm"])
        assert row["train/tokens_per_s"] == pytest.approx(record["tokens_per_s"])
    logged_val = [row for row in rows if "val/loss" in row]
    assert [(row["step"], row["val/loss"]) for row in logged_val] == \
        [(r["step"], pytest.approx(r["val_loss"])) for r in validation]


# --- other outcomes --------------------------------------------------------------------------------------------------

def test_a_failed_job_ends_its_runs_failed(tmp_path, model_dir, monkeypatch):
    def fail():
        raise RuntimeError("disk on fire")

    _offline(monkeypatch, tmp_path)
    _at_step(monkeypatch, 2, fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _customize(tmp_path, model_dir, "job", _logger(tmp_path))
    ids = json.loads((tmp_path / "job/trackers.json").read_text())
    assert mlflow.tracking.MlflowClient(_mlflow_uri(tmp_path)).get_run(ids["mlflow"]).info.status == "FAILED"
    (run,) = _wandb_runs(tmp_path / "wandb_dir")
    assert (run["id"], run["exit_code"]) == (ids["wandb"], 1)
    assert [row["step"] for row in run["history"]] == [1]  # step 2 failed before its record


def _two_rank_job(rank: int, root: str) -> None:
    from nemo_customizer.api import customize

    customize("tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/job", device="cpu", progress_bar=False,
              hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "max_steps": 2},
              model={"checkpoint": f"{root}/model", "random_weights": False},
              logger=_logger(Path(root), wandb_on=False))


def test_only_the_main_rank_logs(tmp_path, model_dir, monkeypatch):
    import shutil

    from _multiproc import run_world

    _offline(monkeypatch, tmp_path)  # the spawned ranks inherit the environment
    shutil.copytree(model_dir, tmp_path / "model")
    write_classification_data(tmp_path / "data", n_train=32, n_val=8)
    run_world(_two_rank_job, 2, str(tmp_path))
    client = mlflow.tracking.MlflowClient(_mlflow_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]


def test_every_number_of_a_record_is_logged_dpo_rewards_too(tmp_path, monkeypatch):
    """A preference job's records carry rewards (and validation records whatever metrics the objective reports):
    each number becomes a metric; other events and non-numbers do not."""
    from nemo_customizer.config import config_from_kwargs
    from nemo_customizer.jobs import JobDirectory
    from nemo_customizer.training.trackers import JobTrackers

    _offline(monkeypatch, tmp_path)
    cfg = config_from_kwargs("tiny-llama-test", dataset="unused", output_dir=str(tmp_path / "job"),
                             logger=_logger(tmp_path, wandb_on=False))
    job = JobDirectory.create(cfg.output_dir, cfg)
    with JobTrackers.open(cfg, job) as trackers:
        trackers.record({"event": "packing", "packing_factor": 2.0})
        trackers.record({"event": "train", "step": 1, "epoch": 0, "loss": 0.7, "lr": 1e-4, "pairs": 8,
                         "rewards_chosen": 0.1, "rewards_rejected": -0.2, "reward_accuracy": 0.75,
                         "reward_margin": 0.3, "skipped": False, "time": 1.0})
        trackers.record({"event": "validation", "step": 1, "epoch": 0, "val_loss": 0.6, "best": True,
                         "val_reward_accuracy": 0.5, "val_mean_token_accuracy": 0.4, "note": "text"})
    client = mlflow.tracking.MlflowClient(_mlflow_uri(tmp_path))
    run = client.get_run(json.loads((job.path / "trackers.json").read_text())["mlflow"])
    assert run.data.metrics == {
        "train/epoch": 0.0, "train/loss": 0.7, "train/lr": 1e-4, "train/pairs": 8.0, "train/rewards_chosen": 0.1,
        "train/rewards_rejected": -0.2, "train/reward_accuracy": 0.75, "train/reward_margin": 0.3,
        "train/skipped": 0.0, "val/epoch": 0.0, "val/loss": 0.6, "val/best": 1.0, "val/reward_accuracy": 0.5,
        "val/mean_token_accuracy": 0.4}
    assert run.info.status == "FINISHED"


def test_a_run_that_cannot_start_fails_the_job_naming_the_setting(tmp_path, model_dir, monkeypatch):
    """MLflow 3 refuses a ``file:`` store unless told otherwise: the job fails before its model is built, status
    ``failed``, and a W&B run already started is ended failed too."""
    from nemo_customizer.training.trackers import TrackerError

    _offline(monkeypatch, tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(TrackerError, match="logger.mlflow: the mlflow run could not start"):
        _customize(tmp_path, model_dir, "job", _logger(tmp_path))
    assert json.loads((tmp_path / "job/status.json").read_text())["status"] == "failed"
    (run,) = _wandb_runs(tmp_path / "wandb_dir")
    assert run["exit_code"] == 1 and not (tmp_path / "job/metrics.jsonl").exists()



def test_the_command_line_prints_a_tracker_that_cannot_start_as_one_error_line(tmp_path, model_dir, monkeypatch,
                                                                               capsys):
    from nemo_customizer import cli

    _offline(monkeypatch, tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    write_classification_data(tmp_path / "data", n_train=16, n_val=8)
    code = cli.main(["model=tiny-llama-test", f"model.checkpoint={model_dir}", "model.random_weights=false",
                     f"dataset.path={tmp_path / 'data'}", f"output_dir={tmp_path / 'job'}", "progress_bar=false",
                     "logger.mlflow.enabled=true", f"logger.mlflow.tracking_uri={_mlflow_uri(tmp_path)}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: logger.mlflow: the mlflow run could not start" in err and "Traceback" not in err

# --- config checks ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_package_is_a_config_error_before_any_data_is_read(tmp_path, monkeypatch, tracker):
    from nemo_customizer.api import customize
    from nemo_customizer.config import ConfigError

    monkeypatch.setitem(sys.modules, tracker, None)  # import <tracker> -> ImportError, as when not installed
    with pytest.raises(ConfigError) as error:
        customize("tiny-llama-test", dataset=str(tmp_path / "no-such-data.jsonl"), output_dir=str(tmp_path / "job"),
                  model={"random_weights": True}, logger={tracker: {"enabled": True}})
    assert str(error.value) == (f"logger.{tracker}.enabled=true needs the {tracker} package: pip install "
                                f"'nemo_customizer[{tracker}]' (or set logger.{tracker}.enabled=false).")
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("override, message", [
    ({"wandb": {"enabled": True, "mode": "shared"}}, "logger.wandb.mode='shared' is not one of online, offline."),
    ({"wandb": {"enabled": True, "project": " "}}, "logger.wandb.project is empty"),
    ({"mlflow": {"enabled": True, "tracking_uri": ""}}, "logger.mlflow.tracking_uri is empty"),
])
def test_tracker_settings_are_checked(override, message):
    from nemo_customizer.config import ConfigError, config_from_kwargs, validate_config

    cfg = config_from_kwargs("tiny-llama-test", dataset="data.jsonl", model={"random_weights": True},
                             logger=override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(cfg)


def test_trackers_are_off_by_default_and_need_nothing_installed(tmp_path, monkeypatch):
    from nemo_customizer.config import config_from_kwargs, validate_config
    from nemo_customizer.jobs import JobDirectory
    from nemo_customizer.training.trackers import JobTrackers

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = config_from_kwargs("tiny-llama-test", dataset="data.jsonl", model={"random_weights": True},
                             output_dir=str(tmp_path / "job"))
    validate_config(cfg)
    with JobTrackers.open(cfg, JobDirectory.create(cfg.output_dir, cfg)) as trackers:
        assert trackers.trackers == ()
        trackers.record({"event": "train", "step": 1, "loss": 1.0})
    assert not (tmp_path / "job/trackers.json").exists()
