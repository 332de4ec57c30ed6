"""The job's ``status.json``: state, progress, best checkpoint and metric series, like NeMo Customizer's
``status_details``.

Only the main rank writes it (other ranks hold a ``JobStatus(None)`` that writes nothing), always whole, to a
temporary file renamed over the old one, so a reader never sees half a file. Written when the job is created, when
training starts, every ``write_every`` steps (but never more than ~1% of the job's time: rewriting a large file
every step of a fast job would cost more), at each validation, and at the end: ``completed``, ``failed`` (with
``failure_reason``) or ``cancelled``.

Each metric series keeps every point up to ``max_points``; past that every other point is dropped and only every
2nd (then 4th, ...) new one is kept, so a long job's series stays evenly spaced and bounded, and the newest point is
always there. ``metrics.jsonl`` is the full record. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from nemo_customizer.jobs import JobDirectory
from nemo_customizer.training.signals import CANCEL_FILE

STATUS_FILE = "status.json"
CREATED, RUNNING, COMPLETED, FAILED, CANCELLED = "created", "running", "completed", "failed", "cancelled"
SERIES = ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s")
_TRAIN_SERIES = {"train_loss": "loss", "lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s"}
"""Series fed by each ``train`` record of metrics.jsonl: series name -> record key."""
PREFERENCE_SERIES = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")
"""Series of a preference (``dpo``) job, each named as its key in ``train`` records and, prefixed ``val_``, in
``validation`` records (``training.preference.PreferenceLoss.metrics``); added to ``SERIES`` when a record has them."""
VALIDATION_SERIES = ("val_mean_token_accuracy",)
"""Series of ``validation`` records only (``training.objective.TokenMeanLoss.metrics``: a supervised job's share of
validation target tokens that are the model's argmax prediction); added to ``SERIES`` when a record has them."""


class JobCancelled(Exception):
    """The job stopped on SIGTERM, SIGINT or a cancel request after finishing its current step (status
    ``cancelled``).

    ``result`` is the partial ``CustomizationResult`` (``status="cancelled"``); the best adapter saved so far, if
    any validation ran, is in the job directory. The command line exits with ``exit_code`` (128 + the signal: 130
    for SIGINT, 143 for SIGTERM and a cancel request), the shell's convention for a process ended by that signal.
    """

    def __init__(self, signal_number: int, steps: int, result=None, reason: str = ""):
        self.signal_number = signal_number
        self.steps = steps
        self.result = result
        super().__init__(f"cancelled by {reason or signal.Signals(signal_number).name} after {steps} steps")

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


class MetricSeries:
    """One metric's points ``{step, value, timestamp}``: at most ``max_points`` evenly spaced ones, plus the newest."""

    def __init__(self, max_points: int = 1000, points: Optional[List[dict]] = None):
        self.max_points = max(max_points, 2)
        self.points: List[dict] = list(points or [])
        self.stride = 1
        self._seen = len(self.points)
        self._newest: Optional[dict] = None  # the latest point when it is off the stride

    def add(self, step: int, value: float, timestamp: str) -> None:
        point = {"step": step, "value": _finite_or_none(value), "timestamp": timestamp}
        if self._seen % self.stride:
            self._newest = point
        else:
            self.points.append(point)
            self._newest = None
            if len(self.points) > self.max_points:
                self.points = self.points[::2]
                self.stride *= 2
        self._seen += 1

    def drop_after(self, step: int) -> None:
        """Forget points past ``step`` (a resumed job redoes those steps)."""
        self.points = [p for p in self.points if p["step"] <= step]
        if self._newest is not None and self._newest["step"] > step:
            self._newest = None

    def to_list(self) -> List[dict]:
        return self.points + ([self._newest] if self._newest else [])


class JobStatus:
    """The job's state and progress, mirrored to ``<job_dir>/status.json`` (writes nothing when ``job`` is None).

    Creating it writes status ``created`` (an existing ``status.json`` is continued: its history and series are
    kept). The training loop gives it its state's fields (``update``) before each metrics record, and every record
    feeds the series (``record``, a ``MetricsLog`` listener); ``tracking()`` marks the job ``failed`` or
    ``cancelled`` when an exception leaves it.
    """

    def __init__(self, job: Optional[JobDirectory], *, write_every: int = 1, max_points: int = 1000):
        self.job = job
        self.write_every = max(write_every, 1)
        self._started = time.time()
        self._last_write_end, self._last_write_cost = 0.0, 0.0
        previous = _read_existing(job.path / STATUS_FILE) if job is not None else None
        series = (previous or {}).get("metrics", {}).get("metrics", {})
        self.max_points = max_points
        self.series: Dict[str, MetricSeries] = {name: MetricSeries(max_points, series.get(name))
                                                for name in (*SERIES, *(n for n in series if n not in SERIES))}
        self.state: dict = {
            "status": CREATED, "created_at": _iso(self._started), "updated_at": _iso(self._started),
            "steps_completed": 0, "total_steps": None, "steps_per_epoch": None, "epochs_completed": 0,
            "percentage_done": 0.0, "elapsed_time": 0.0, "best_epoch": None, "best_step": None, "train_loss": None,
            "val_loss": None, "failure_reason": None, "pid": os.getpid(), "host": socket.gethostname(),
            "status_logs": [],
        }
        if previous:  # a job continued in the same directory: keep its start time, history and best checkpoint
            for key in ("created_at", "status_logs", "best_epoch", "best_step", "train_loss", "val_loss"):
                self.state[key] = previous.get(key, self.state[key])
        self._set(CREATED)

    def running(self, *, total_steps: int, steps_per_epoch: int, steps_completed: int = 0) -> None:
        """Training starts (at ``steps_completed`` when resumed: later points of a previous run are dropped)."""
        for series in self.series.values():
            series.drop_after(steps_completed)
        self.state.update(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self._progress(steps_completed)
        self._set(RUNNING, f"{total_steps} steps, {steps_per_epoch} per epoch")

    def update(self, fields: dict) -> None:
        """Take the training loop's progress and best checkpoint (``LoopState.status_fields()``); written with the
        next record or state change."""
        self.state.update(fields)
        self._progress(fields["steps_completed"])

    def record(self, record: dict) -> None:
        """Take one metrics.jsonl record into the series (``train`` and ``validation`` events; others are ignored)."""
        event, step = record.get("event"), record.get("step")
        timestamp = _iso(record.get("time", time.time()))
        if event == "train":
            for name, key in (*_TRAIN_SERIES.items(), *((n, n) for n in PREFERENCE_SERIES)):
                if key in record:
                    self._series(name).add(step, record[key], timestamp)
            if step % self.write_every == 0 and self._write_is_cheap():
                self._write()
        elif event == "validation":
            for name in ("val_loss", *VALIDATION_SERIES, *(f"val_{n}" for n in PREFERENCE_SERIES)):
                if name in record:
                    self._series(name).add(step, record[name], timestamp)
            self._write()

    def _series(self, name: str) -> MetricSeries:
        if name not in self.series:
            self.series[name] = MetricSeries(self.max_points)
        return self.series[name]

    def record_evaluation(self, summary: dict) -> None:
        """Held-out metrics per model (``{"base": {...}, "customized": {...}}``), merged into ``evaluation``."""
        self.state["evaluation"] = {**(self.state.get("evaluation") or {}), **summary}
        self._write()

    def completed(self) -> None:
        self.state["percentage_done"] = 100.0
        self._set(COMPLETED)

    def failed(self, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.state["failure_reason"] = reason
        self._set(FAILED, reason)

    def cancelled(self, detail: str) -> None:
        self._set(CANCELLED, detail)

    @contextlib.contextmanager
    def tracking(self) -> Iterator["JobStatus"]:
        """Mark the job ``cancelled`` (JobCancelled, KeyboardInterrupt) or ``failed`` (any other exception) when an
        exception leaves the block, then re-raise it. A status file that cannot be written then does not hide it."""
        try:
            yield self
        except BaseException as error:
            with contextlib.suppress(OSError):
                if isinstance(error, JobCancelled):
                    self.cancelled(str(error))
                elif isinstance(error, KeyboardInterrupt):
                    self.cancelled(f"interrupted (KeyboardInterrupt) after {self.state['steps_completed']} steps; "
                                   "nothing was saved at the interruption")
                else:
                    self.failed(error)
            raise

    def series_points(self) -> Dict[str, List[dict]]:
        """Every series' current points (for plots)."""
        return {name: series.to_list() for name, series in self.series.items()}

    def to_json(self) -> dict:
        self.state["updated_at"] = _iso(time.time())
        self.state["elapsed_time"] = round(time.time() - self._started, 3)
        return {**self.state, "metrics": {"keys": list(self.series), "metrics": self.series_points()}}

    def _progress(self, step: int) -> None:
        total, per_epoch = self.state["total_steps"], self.state["steps_per_epoch"]
        self.state["steps_completed"] = step
        self.state["epochs_completed"] = step // per_epoch if per_epoch else 0
        self.state["percentage_done"] = round(100.0 * step / total, 2) if total else 0.0

    def _set(self, status: str, detail: Optional[str] = None) -> None:
        self.state["status"] = status
        self.state["status_logs"].append({"updated_at": _iso(time.time()), "message": status, "detail": detail})
        self._write()

    def _write_is_cheap(self) -> bool:
        """Keep status.json writes under ~1% of the job's wall time (a long job's series make each write larger)."""
        return time.perf_counter() - self._last_write_end >= 100 * self._last_write_cost

    def _write(self) -> None:
        if self.job is None:
            return
        started = time.perf_counter()
        self.job.write_atomic(STATUS_FILE, json.dumps(self.to_json(), allow_nan=False) + "\n")
        self._last_write_end = time.perf_counter()
        self._last_write_cost = self._last_write_end - started


def read_status(job_dir: str | os.PathLike) -> dict:
    """The ``status.json`` of a job directory; ``FileNotFoundError`` naming what is missing."""
    path = Path(job_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{job_dir}: no such directory")
    if not (path / STATUS_FILE).is_file():
        raise FileNotFoundError(f"{job_dir} holds no job: no {STATUS_FILE} (is it a customization job's output_dir?)")
    return json.loads((path / STATUS_FILE).read_text(encoding="utf-8"))


def describe_status(status: dict, job_dir: Optional[str] = None) -> str:
    """A few readable lines: state, progress, elapsed time, best checkpoint, latest train step, failure reason."""
    state = status["status"]
    if state in (CREATED, RUNNING) and not process_alive(status):
        state += f" (but its process {status.get('pid')} is gone: killed?)"
    elif state in (CREATED, RUNNING) and job_dir and (Path(job_dir).expanduser() / CANCEL_FILE).exists():
        state += " (cancel requested: it stops after its current step and saves a checkpoint)"
    lines = [("job", str(job_dir))] if job_dir else []
    lines.append(("status", state))
    total, done = status.get("total_steps"), status.get("steps_completed", 0)
    if total:
        per_epoch = status.get("steps_per_epoch")
        lines.append(("progress", f"step {done}/{total} ({status.get('percentage_done', 0):.1f}%), "
                                  f"{status.get('epochs_completed', 0)} epochs done, {per_epoch} steps per epoch"))
    lines.append(("elapsed", _duration(status.get("elapsed_time", 0.0))))
    if status.get("best_step") is not None:
        lines.append(("best", f"epoch {status['best_epoch']}, step {status['best_step']}: val_loss "
                              f"{_num(status.get('val_loss'))} (train_loss {_num(status.get('train_loss'))})"))
    series = status.get("metrics", {}).get("metrics", {})
    last = {name: points[-1] for name, points in series.items() if points}
    if "train_loss" in last:
        point = last["train_loss"]
        same_step = {name: last[name]["value"] for name in ("lr", "grad_norm", "tokens_per_s")
                     if name in last and last[name]["step"] == point["step"] and last[name]["value"] is not None}
        extra = "".join((f", lr {same_step['lr']:.3g}" if "lr" in same_step else "",
                         f", grad_norm {same_step['grad_norm']:.3g}" if "grad_norm" in same_step else "",
                         f", {same_step['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in same_step else ""))
        lines.append(("last", f"step {point['step']}: train_loss {_num(point['value'])}{extra}"))
    if status.get("failure_reason"):
        lines.append(("failure", status["failure_reason"]))
    elif state.startswith(CANCELLED) and status.get("status_logs"):
        lines.append(("cancel", status["status_logs"][-1].get("detail") or ""))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in lines)


def _read_existing(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def process_alive(status: dict) -> bool:
    """False only when the job ran on this host and its process no longer exists."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return True
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _finite_or_none(value) -> Optional[float]:
    """JSON has no NaN: a non-finite value is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _num(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds or 0, 0))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"
