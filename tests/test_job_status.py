"""status.json through a job's life (created, running, completed / failed / cancelled), NaN/inf stops before the
update, SIGTERM/SIGINT/``cancel`` stop after a finished step (also over two ranks), loss.png, TensorBoard,
``status``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from _tiny import write_classification_data

REPO = Path(__file__).resolve().parents[1]


def _customize(root: Path, model_dir: Path, name: str, **hyperparameters):
    from nemo_customizer.api import customize

    if not (root / "data").exists():
        write_classification_data(root / "data", n_train=32, n_val=8)
    hp = {"epochs": 2, "batch_size": 8, "micro_batch_size": 8, "val_check_interval": 2, **hyperparameters}
    return customize("tiny-llama-test", dataset=str(root / "data"), output_dir=str(root / name), progress_bar=False,
                     hyperparameters=hp, model={"checkpoint": str(model_dir), "random_weights": False})


def _records(job: Path, event: str) -> list:
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def _status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


@pytest.fixture(scope="module")
def completed_job(tmp_path_factory, model_dir):
    """A finished job; what it logged to stderr is in ``job.log`` beside its directory."""
    root = tmp_path_factory.mktemp("completed")
    with contextlib.redirect_stderr(io.StringIO()) as log:
        result = _customize(root, model_dir, "job")
    (root / "job.log").write_text(log.getvalue())
    return root / "job", result


def test_completed_job_status_and_series_match_metrics(completed_job):
    from nemo_customizer.training.status import _iso

    job, result = completed_job
    status = _status(job)
    assert result.status == "completed"
    assert [log["message"] for log in status["status_logs"]] == ["created", "running", "completed"]
    assert (status["status"], status["steps_completed"], status["total_steps"], status["steps_per_epoch"],
            status["epochs_completed"], status["percentage_done"]) == ("completed", 8, 8, 4, 2, 100.0)
    assert status["elapsed_time"] > 0 and status["failure_reason"] is None
    train, validation = _records(job, "train"), _records(job, "validation")
    # the best checkpoint: its epoch and step, its validation loss and the training loss of that step
    assert (status["best_epoch"], status["best_step"], status["val_loss"]) == \
        (result.best_epoch, result.best_step, result.best_val_loss)
    assert status["train_loss"] == next(r["loss"] for r in train if r["step"] == result.best_step)
    series = status["metrics"]["metrics"]
    assert status["metrics"]["keys"] == ["train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s",
                                         "val_mean_token_accuracy"]
    for name, records, key in [("train_loss", train, "loss"), ("lr", train, "lr"), ("grad_norm", train, "grad_norm"),
                               ("tokens_per_s", train, "tokens_per_s"), ("val_loss", validation, "val_loss"),
                               ("val_mean_token_accuracy", validation, "val_mean_token_accuracy")]:
        assert series[name] == [{"step": r["step"], "value": r[key], "timestamp": _iso(r["time"])} for r in records]
    assert len(series["train_loss"]) == 8 and len(series["val_loss"]) == 4
    assert all("mean_token_accuracy" not in r for r in train)  # measured by validation only


def test_validation_token_accuracy_is_logged_beside_val_loss(completed_job):
    """Each validation record has ``val_mean_token_accuracy`` (a share of the validation set's target tokens: its
    numerics are pinned against transformers in ``test_model_parity``), and the job's log line shows it."""
    job, _ = completed_job
    validation = _records(job, "validation")
    assert len(validation) == 4 and all(0.0 <= r["val_mean_token_accuracy"] <= 1.0 for r in validation)
    lines = [line for line in (job.parent / "job.log").read_text().splitlines() if line.startswith("validation  ")]
    assert [line.split(": ", 1)[1].split("  (")[0] for line in lines] == \
        [f"val_loss {r['val_loss']:.4f}, val_mean_token_accuracy {r['val_mean_token_accuracy']:.4f}"
         for r in validation]


def test_loss_plot_is_a_png(completed_job):
    pytest.importorskip("matplotlib")
    job, _ = completed_job
    assert (job / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in job.iterdir() if p.name.startswith(".loss.png")]  # no temporary file left behind


def test_loss_plot_draws_validation_token_accuracy_below_the_loss(completed_job):
    pytest.importorskip("matplotlib")
    from nemo_customizer.training.plots import loss_figure

    job, _ = completed_job
    series = _status(job)["metrics"]["metrics"]
    axes = {axis.get_ylabel(): axis for axis in loss_figure(series).axes}
    assert sorted(axes) == ["learning rate", "loss", "token accuracy"]
    accuracy_axis = axes["token accuracy"]
    (line,) = accuracy_axis.get_lines()
    assert list(line.get_ydata()) == [p["value"] for p in series["val_mean_token_accuracy"]]
    without = {name: points for name, points in series.items() if name != "val_mean_token_accuracy"}
    assert len(loss_figure(without).axes) == 2  # a job that measures no accuracy (DPO): loss and lr only


def test_tensorboard_scalars(completed_job):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, _ = completed_job
    events = EventAccumulator(str(job / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                    "val/mean_token_accuracy"}
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("val/loss")] == \
        pytest.approx([r["val_loss"] for r in _records(job, "validation")])
    assert [e.value for e in events.Scalars("val/mean_token_accuracy")] == \
        pytest.approx([r["val_mean_token_accuracy"] for r in _records(job, "validation")])


def test_status_command_prints_a_summary_and_the_json(completed_job, capsys):
    from nemo_customizer import cli

    job, result = completed_job
    assert cli.main(["status", str(job)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["status"] == "completed"
    assert lines["progress"].startswith("step 8/8 (100.0%), 2 epochs done, 4 steps per epoch")
    assert lines["best"].startswith(f"epoch {result.best_epoch}, step {result.best_step}: val_loss "
                                    f"{result.best_val_loss:.4f}")
    assert lines["last"].startswith(f"step 8: train_loss {result.final_train_loss:.4f}, lr ")
    assert "elapsed" in lines and "failure" not in lines
    assert cli.main(["status", str(job), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _status(job)


def test_status_command_errors_without_a_job(tmp_path, capsys):
    from nemo_customizer import cli

    assert cli.main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} holds no job: no status.json (is it a " \
                                               "customization job's output_dir?)"
    assert cli.main(["status", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def _inject_at_step(monkeypatch, step: int, action):
    """Call ``action(model)`` inside training step ``step``, after its forward/backward and before the optimizer;
    returns the trainable weights as they were when the step began."""
    from nemo_customizer.training import step as step_module

    original, calls, before = step_module.forward_backward, [0], {}

    def forward_backward(model, micro_batches, device, forward_only, **kwargs):
        if not forward_only:
            calls[0] += 1
            if calls[0] == step:
                before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
                before["model"] = model
        out = original(model, micro_batches, device, forward_only, **kwargs)
        return action(model, out) if not forward_only and calls[0] == step else out

    monkeypatch.setattr(step_module, "forward_backward", forward_backward)
    return before


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_stops_the_job_failed_before_the_update(tmp_path, model_dir, monkeypatch, what):
    """A NaN loss or gradient norm at step 3: status failed naming the step, weights not updated, step-2 save kept."""
    saved = {}

    def poison(model, out):
        saved["adapter"] = (tmp_path / "job" / "adapter" / "adapter_model.safetensors").read_bytes()
        if what == "loss":
            return torch.stack([torch.full_like(out[0], math.nan), out[1]])
        next(p for p in model.parameters() if p.requires_grad).main_grad.view(-1)[0] = math.nan
        return out

    before = _inject_at_step(monkeypatch, 3, poison)
    expected = "training loss is nan" if what == "loss" else "gradient norm is nan"
    with pytest.raises(FloatingPointError, match=f"{expected} at step 3; the update was not applied"):
        _customize(tmp_path, model_dir, "job", val_check_interval=1,
                   early_stopping={"min_delta": 0.0, "patience": 100})
    status = _status(tmp_path / "job")
    assert status["status"] == "failed" and status["steps_completed"] == 2
    assert status["failure_reason"].startswith(f"FloatingPointError: {expected} at step 3")
    assert [r["step"] for r in _records(tmp_path / "job", "train")] == [1, 2]
    assert status["best_step"] == 2
    # the step-3 update never happened, and nothing was saved after step 2
    model = before.pop("model")
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(after[n].equal(before[n]) for n in before)
    assert (tmp_path / "job" / "adapter" / "adapter_model.safetensors").read_bytes() == saved["adapter"]


def test_nan_read_after_the_next_step_was_queued_still_fails_the_job_at_its_step(tmp_path, model_dir, monkeypatch):
    """Step 3 (no validation after it) is read only once step 4 is queued: the job still fails naming step 3, records
    nothing after step 2 and saves nothing after step 2's validation."""
    saved = {}

    def poison(model, out):
        saved["adapter"] = (tmp_path / "job" / "adapter" / "adapter_model.safetensors").read_bytes()
        return torch.stack([torch.full_like(out[0], math.nan), out[1]])

    from nemo_customizer.training import pipelined

    monkeypatch.setattr(pipelined, "overlaps", lambda device: True)  # as on a GPU
    _inject_at_step(monkeypatch, 3, poison)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 3; the update was not applied"):
        _customize(tmp_path, model_dir, "job", early_stopping={"min_delta": 0.0, "patience": 100})
    status = _status(tmp_path / "job")
    assert status["status"] == "failed" and status["steps_completed"] == 2
    assert [r["step"] for r in _records(tmp_path / "job", "train")] == [1, 2]
    assert [r["step"] for r in _records(tmp_path / "job", "validation")] == [2]
    assert (tmp_path / "job" / "adapter" / "adapter_model.safetensors").read_bytes() == saved["adapter"]


def test_an_error_after_the_job_directory_exists_marks_it_failed(tmp_path, model_dir, monkeypatch):
    from nemo_customizer.data.errors import DatasetError
    from nemo_customizer.training import loop

    original = loop._training_batches

    def batches(job, items, epoch, skip=0):
        for number, step in enumerate(original(job, items, epoch, skip)):
            if number == 2:
                raise DatasetError("training.jsonl:5: field \"completion\" must be a string")
            yield step

    monkeypatch.setattr(loop, "_training_batches", batches)
    with pytest.raises(DatasetError):
        _customize(tmp_path, model_dir, "job")
    status = _status(tmp_path / "job")
    assert (status["status"], status["steps_completed"]) == ("failed", 2)
    assert status["failure_reason"] == 'DatasetError: training.jsonl:5: field "completion" must be a string'
    assert status["status_logs"][-1]["detail"] == status["failure_reason"]
    assert not (tmp_path / "job" / "result.json").exists()
    from nemo_customizer.training.status import describe_status

    assert describe_status(status).splitlines()[-1].split(None, 1) == ["failure", status["failure_reason"]]


def test_sigint_in_process_finishes_the_step_and_raises_job_cancelled(tmp_path, model_dir, monkeypatch):
    from nemo_customizer.api import JobCancelled
    from nemo_customizer.training import loop

    checkpoints = []
    original_fit = loop.fit

    def fit(job):  # records the resumable checkpoints the job saves
        save = job.save_checkpoint
        job.save_checkpoint = lambda state: (checkpoints.append(state.steps), save(state))
        return original_fit(job)

    monkeypatch.setattr(loop, "fit", fit)
    _inject_at_step(monkeypatch, 3, lambda model, out: (os.kill(os.getpid(), signal.SIGINT), out)[1])
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(JobCancelled) as cancelled:
        _customize(tmp_path, model_dir, "job", epochs=5)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert (cancelled.value.steps, cancelled.value.exit_code) == (3, 130)
    assert cancelled.value.result.status == "cancelled" and cancelled.value.result.steps == 3
    assert checkpoints[-1] == 3  # saved after the step the signal interrupted
    assert (tmp_path / "job/checkpoints/latest").read_text().strip() == "step_00000003"
    status = _status(tmp_path / "job")
    assert (status["status"], status["steps_completed"]) == ("cancelled", 3)
    assert "SIGINT after 3 steps" in status["status_logs"][-1]["detail"]
    assert [r["step"] for r in _records(tmp_path / "job", "train")] == [1, 2, 3]


def test_cancel_command_stops_the_job_after_its_step_and_a_rerun_resumes(tmp_path, model_dir, monkeypatch, capsys):
    """``cancel`` during step 3: the job saves, ends cancelled (exit code 143); the request file is spent when the
    same job runs again, which resumes from step 3 to the end with every step logged once."""
    from nemo_customizer import cli
    from nemo_customizer.api import JobCancelled

    job = tmp_path / "job"

    def cancel(model, out):
        assert cli.main(["cancel", str(job)]) == 0
        return out

    _inject_at_step(monkeypatch, 3, cancel)
    with pytest.raises(JobCancelled) as cancelled:
        _customize(tmp_path, model_dir, "job", epochs=3)
    assert "cancel requested" in capsys.readouterr().out
    assert (cancelled.value.steps, cancelled.value.exit_code) == (3, 143)
    assert str(cancelled.value) == "cancelled by cancel request after 3 steps"
    assert (job / "checkpoints/latest").read_text().strip() == "step_00000003"
    status = _status(job)
    assert (status["status"], status["steps_completed"]) == ("cancelled", 3)
    assert status["status_logs"][-1]["detail"] == "cancelled by cancel request after 3 steps"
    assert (job / "CANCEL").exists()
    assert cli.main(["cancel", str(job)]) == 2  # nothing running to cancel
    assert "the job is cancelled; only a created or running job can be cancelled" in capsys.readouterr().err

    monkeypatch.undo()
    result = _customize(tmp_path, model_dir, "job", epochs=3)
    assert result.steps == 12 and not (job / "CANCEL").exists()
    assert [r["step"] for r in _records(job, "train")] == list(range(1, 13))
    assert _status(job)["status"] == "completed"
    assert cli.main(["cancel", str(job)]) == 2
    assert "the job is completed" in capsys.readouterr().err
    assert cli.main(["cancel", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cancel_refuses_a_job_whose_process_is_gone(tmp_path, capsys):
    import socket

    from nemo_customizer import cli

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    (tmp_path / "status.json").write_text(json.dumps({"status": "running", "pid": finished.pid,
                                                      "host": socket.gethostname()}))
    assert cli.main(["cancel", str(tmp_path)]) == 2
    assert f"the job's process {finished.pid} is gone (killed?)" in capsys.readouterr().err
    assert not (tmp_path / "CANCEL").exists()


def test_status_shows_a_pending_cancel_request(tmp_path, capsys):
    import socket

    from nemo_customizer import cli

    (tmp_path / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(),
                                                      "host": socket.gethostname()}))
    assert cli.main(["cancel", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["status", str(tmp_path)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["status"] == "running (cancel requested: it stops after its current step and saves a checkpoint)"


def test_sigterm_cancels_a_command_line_job(tmp_path, model_dir):
    """A CPU job in its own process gets SIGTERM after a few steps: it exits 143 with status cancelled, and
    status.json parses at every moment while it runs."""
    write_classification_data(tmp_path / "data", n_train=32, n_val=8)
    job = tmp_path / "job"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "nemo_customizer", "model=tiny-llama-test", f"model.checkpoint={model_dir}",
         "model.random_weights=false", f"dataset.path={tmp_path / 'data'}", f"output_dir={job}", "progress_bar=false",
         "hyperparameters.epochs=500", "hyperparameters.batch_size=8", "hyperparameters.micro_batch_size=8",
         "hyperparameters.val_check_interval=3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads, deadline = 0, time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if (job / "status.json").exists():
                json.loads((job / "status.json").read_text())  # never half written
                reads += 1
            if (job / "metrics.jsonl").exists() and len(_records(job, "train")) >= 4:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    status = _status(job)
    steps = len(_records(job, "train"))
    assert status["status"] == "cancelled" and status["steps_completed"] == steps
    assert 4 <= steps < status["total_steps"]
    assert f"cancelled by SIGTERM after {steps} steps (status: {job}/status.json)" in err
    assert reads > 0 and out == ""


def _two_rank_job(rank: int, root: str, signal_rank: int) -> None:
    """DP=2: only ``signal_rank`` gets SIGTERM (during step 2); every rank must stop after step 2."""
    from nemo_customizer.api import JobCancelled, customize
    from nemo_customizer.training import step as step_module

    original, calls = step_module.forward_backward, [0]

    def forward_backward(model, micro_batches, device, forward_only, **kwargs):
        if not forward_only:
            calls[0] += 1
            if calls[0] == 2 and rank == signal_rank:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(model, micro_batches, device, forward_only, **kwargs)

    step_module.forward_backward = forward_backward
    try:
        customize("tiny-llama-test", dataset=f"{root}/data", output_dir=f"{root}/job", device="cpu",
                  progress_bar=False, hyperparameters={"epochs": 5, "batch_size": 8, "micro_batch_size": 4},
                  model={"checkpoint": f"{root}/model", "random_weights": False})
    except JobCancelled as cancelled:
        Path(root, f"rank{rank}.json").write_text(json.dumps([cancelled.steps, cancelled.signal_number]))


def test_ranks_agree_on_the_step_to_stop_at(tmp_path, model_dir):
    import shutil

    from _multiproc import run_world

    shutil.copytree(model_dir, tmp_path / "model")
    write_classification_data(tmp_path / "data", n_train=32, n_val=8)
    run_world(_two_rank_job, 2, str(tmp_path), 1)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[2, signal.SIGTERM]] * 2
    status = _status(tmp_path / "job")
    assert (status["status"], status["steps_completed"]) == ("cancelled", 2)


def test_status_json_is_replaced_whole_while_a_reader_reads(tmp_path):
    from nemo_customizer.jobs import JobDirectory
    from nemo_customizer.training.status import JobStatus

    status = JobStatus(JobDirectory(tmp_path), max_points=2000)
    assert _status(tmp_path)["status"] == "created"
    status.running(total_steps=2000, steps_per_epoch=1000)
    for step in range(1, 2001):  # ~1 MB of series: each write takes a while
        status.series["train_loss"].add(step, 1.0 / step, "2026-01-01T00:00:00.000+00:00")
    failures, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                json.loads((tmp_path / "status.json").read_text())
            except ValueError as err:
                failures.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(100):
        status._write()
    stop.set()
    reader.join()
    assert failures == []
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_series_stay_bounded_and_evenly_spaced():
    from nemo_customizer.training.status import MetricSeries

    series = MetricSeries(max_points=100)
    for step in range(1, 10_001):
        series.add(step, float(step), "t")
    steps = [p["step"] for p in series.to_list()]
    assert len(steps) <= 101 and steps[0] == 1 and steps[-1] == 10_000
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1])}
    assert gaps == {128}  # every 128th step: evenly spaced, apart from the newest point
    series.add(10_001, math.nan, "t")
    assert series.to_list()[-1] == {"step": 10_001, "value": None, "timestamp": "t"}  # JSON has no NaN


def test_a_status_file_is_continued_in_the_same_directory(tmp_path):
    """A job continued in its directory (resume) keeps the history and drops points it will redo."""
    from nemo_customizer.jobs import JobDirectory
    from nemo_customizer.training.status import JobStatus

    first = JobStatus(JobDirectory(tmp_path))
    first.running(total_steps=10, steps_per_epoch=5)
    for step in range(1, 7):
        first.record({"event": "train", "step": step, "loss": 1.0, "time": 0.0})
    first.cancelled("test")
    second = JobStatus(JobDirectory(tmp_path))
    second.running(total_steps=10, steps_per_epoch=5, steps_completed=4)
    status = _status(tmp_path)
    assert [log["message"] for log in status["status_logs"]] == ["created", "running", "cancelled", "created",
                                                                 "running"]
    assert [p["step"] for p in status["metrics"]["metrics"]["train_loss"]] == [1, 2, 3, 4]
    assert status["steps_completed"] == 4


def test_without_matplotlib_the_job_logs_once_and_draws_nothing(tmp_path, monkeypatch):
    from nemo_customizer.jobs import JobDirectory
    from nemo_customizer.training.plots import JobPlots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    logged = []
    series = {"train_loss": [{"step": 1, "value": 1.0}], "val_loss": [{"step": 1, "value": 1.0}]}
    plots = JobPlots(JobDirectory(tmp_path), lambda: series, logged.append)
    plots._tensorboard_ok = False  # TensorBoard is another test's subject
    for _ in range(2):
        plots.record({"event": "validation", "step": 1, "val_loss": 1.0})
    plots.close()
    assert not (tmp_path / "loss.png").exists()
    assert len(logged) == 1 and "matplotlib is not installed" in logged[0]


def test_job_files_are_written_with_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the files must still be readable like any other file."""
    from nemo_customizer.jobs import JobDirectory

    old = os.umask(0o022)
    try:
        JobDirectory(tmp_path).write_atomic("status.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "status.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "status.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind
