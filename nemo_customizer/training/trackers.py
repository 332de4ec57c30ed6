"""Experiment trackers: a Weights & Biases run (``logger.wandb``) and an MLflow run (``logger.mlflow``) of the job,
each only when turned on (``config.validate`` checked that its package is installed before any data was read).

One small class per tracker behind ``Tracker``; the job holds them through ``JobTrackers``, which

- opens each run once the job directory exists and logs the resolved config (without ``serving``: the server's
  settings, its API key among them, are no part of a training job);
- is a ``MetricsLog`` listener (``record``), like the job status and the plots: every number of a ``train`` record
  becomes the metric ``train/<key>``, of a ``validation`` record ``val/<key>`` (``val_loss`` -> ``val/loss``), at the
  record's step: loss, lr, grad_norm, tokens_per_s, DPO rewards, whatever the record carries (the five TensorBoard
  tags are the same names);
- as a context manager around the job, ends each run with the job's outcome: finished, failed, or killed (a stop
  signal or cancel request; W&B gets the exit code, 128 + the signal).

A job continued in the same ``output_dir`` continues the same runs: their ids are kept in ``<job_dir>/trackers.json``.
Steps trained again after a resume (those past the checkpoint it resumed from) are logged again.

Main rank only (``JobTrackers.open(cfg, None)`` opens nothing). A run that cannot start fails the job before the
model is built; a record a tracker fails to log is reported once, and that tracker logs nothing more (training goes
on). Importing this module imports neither torch nor the trackers' packages.
"""

from __future__ import annotations

import abc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from nemo_customizer.config import Config
from nemo_customizer.config.schema import MlflowConfig, WandbConfig
from nemo_customizer.jobs import JobDirectory
from nemo_customizer.training.status import CANCELLED, COMPLETED, FAILED, JobCancelled

TRACKERS_FILE = "trackers.json"
"""In the job directory: ``{"wandb": run id, "mlflow": run id}`` of the runs a resumed job continues."""
DEFAULT_PROJECT = "nemo_customizer"
"""W&B project and MLflow experiment when neither the config nor the tracker's environment variable names one."""
STEP_METRIC = "step"
"""W&B: the x axis of every metric (the job's optimizer step, which a resumed job repeats; W&B's own step counts
calls)."""
_METRIC_PREFIX = {"train": "train/", "validation": "val/"}
_NOT_METRICS = ("event", "step", "time")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class TrackerError(RuntimeError):
    """A tracker's run could not start (the job fails before its model is built)."""


class Tracker(abc.ABC):
    """One run in one experiment tracker; opened with the job's resolved config, continued when ``run_id`` is
    given."""

    title: str = ""
    """How the job's log names it (``W&B``, ``MLflow``)."""
    run_id: str = ""
    continued: bool = False
    """The run was an earlier process's of this job."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Dict[str, float], step: int, timestamp: float) -> None:
        """Log the numbers of one record at the job's optimizer ``step`` (``timestamp``: the record's, in seconds)."""

    @abc.abstractmethod
    def finish(self, status: str, exit_code: int) -> None:
        """End the run: ``status`` is the job's (``completed``, ``failed``, ``cancelled``); ``exit_code`` the
        process's (0, 1, 128 + a stop signal)."""


class WandbRun(Tracker):
    """A W&B run (``wandb.init`` with ``reinit="create_new"``: a run of the caller's own is left alone). The metrics
    use the job's step as their x axis (``STEP_METRIC``), so a resumed job's repeated steps are not dropped."""

    title = "W&B"

    def __init__(self, settings: WandbConfig, job_dir: Path, config: dict, run_id: Optional[str]):
        import wandb

        # The defaults are resolved here: W&B reads its environment once per process, at its first run.
        directory = Path(settings.dir or os.environ.get("WANDB_DIR") or job_dir)
        directory.mkdir(parents=True, exist_ok=True)  # else W&B falls back to a temporary directory
        self._run = wandb.init(
            project=settings.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=settings.entity, name=settings.name or job_dir.name, group=settings.group,
            tags=list(settings.tags) or None, mode=settings.mode, dir=str(directory),
            id=run_id, resume="allow" if run_id else None, reinit="create_new",
        )
        self._run.config.update(config, allow_val_change=True)  # a resumed job may change its parallel layout
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)
        self.run_id, self.continued = self._run.id, run_id is not None

    def log_metrics(self, metrics: Dict[str, float], step: int, timestamp: float) -> None:
        self._run.log({**metrics, STEP_METRIC: step})

    def finish(self, status: str, exit_code: int) -> None:
        self._run.finish(exit_code=exit_code)


class MlflowRun(Tracker):
    """An MLflow run, through ``MlflowClient`` (no active-run state of the caller's is touched). The config is
    logged as params with dotted keys (``hyperparameters.learning_rate``); a continued run keeps the values it has
    (MLflow refuses to change a param). One request to the tracking store per record, or MLflow's async logging
    where ``MLFLOW_ENABLE_ASYNC_LOGGING=true`` (waited for when the run ends)."""

    title = "MLflow"
    PARAMS_PER_REQUEST = 100  # MLflow's limit per log_batch
    PARAM_VALUE_LENGTH = 6000  # MLflow's limit on a param's value: longer ones (a chat template's text) are cut

    def __init__(self, settings: MlflowConfig, job_dir: Path, config: dict, run_id: Optional[str]):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=settings.tracking_uri)  # None: $MLFLOW_TRACKING_URI or MLflow's
        run = self._existing_run(run_id) if run_id else None
        self.continued = run is not None
        if run is None:
            name = settings.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            run = self._client.create_run(self._experiment_id(name), run_name=settings.run_name or job_dir.name)
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self._pending: List[object] = []  # async logging's operations, waited for in finish()
        self._log_params(config, logged=run.data.params)

    def _existing_run(self, run_id: str):
        """The run a previous process of this job started, or None where this tracking store does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name)
        except MlflowException as err:  # another job created it meanwhile
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                raise err from None
            return experiment.experiment_id

    def _log_params(self, config: dict, logged: Dict[str, str]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:self.PARAM_VALUE_LENGTH]) for key, value in _flatten(config).items()
                  if key not in logged]
        for start in range(0, len(params), self.PARAMS_PER_REQUEST):
            self._client.log_batch(self.run_id, params=params[start:start + self.PARAMS_PER_REQUEST])

    def log_metrics(self, metrics: Dict[str, float], step: int, timestamp: float) -> None:
        from mlflow.entities import Metric

        milliseconds = int(timestamp * 1000)
        operation = self._client.log_batch(
            self.run_id, metrics=[Metric(key, value, milliseconds, step) for key, value in metrics.items()])
        if operation is not None:
            self._pending.append(operation)

    def finish(self, status: str, exit_code: int) -> None:
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()
        self._client.set_terminated(self.run_id, {COMPLETED: "FINISHED", CANCELLED: "KILLED"}.get(status, "FAILED"))


TRACKER_CLASSES = {"wandb": WandbRun, "mlflow": MlflowRun}
"""``logger.<name>`` -> its tracker."""


class JobTrackers:
    """The job's tracker runs: a ``MetricsLog`` listener (``record``) and a context manager that ends each run with
    the job's outcome. ``open`` starts them."""

    def __init__(self, trackers: Sequence[Tracker] = (), log: Callable[[str], None] = _stderr):
        self.trackers = tuple(trackers)
        self._logging = list(self.trackers)  # those that have not failed to log
        self._log = log

    @classmethod
    def open(cls, cfg: Config, job: Optional[JobDirectory], log: Callable[[str], None] = _stderr) -> "JobTrackers":
        """Start (or continue, from ``trackers.json``) a run in each tracker ``cfg.logger`` turns on, logging the
        resolved config; nothing when ``job`` is None (ranks other than the main one)."""
        names = [name for name in TRACKER_CLASSES if getattr(cfg.logger, name).enabled]
        if job is None or not names:
            return cls((), log)
        run_ids = _read_run_ids(job.path / TRACKERS_FILE)
        config = loggable_config(cfg)
        opened: List[Tracker] = []
        try:
            for name in names:
                tracker = _start(name, getattr(cfg.logger, name), job.path, config, run_ids.get(name))
                opened.append(tracker)
                run_ids[name] = tracker.run_id
                log(f"{tracker.title}: {'continuing' if tracker.continued else 'started'} run {tracker.run_id}")
            job.write_atomic(TRACKERS_FILE, json.dumps(run_ids, indent=2) + "\n")
        except BaseException:
            cls(opened, log).finish(FAILED, 1)  # a run already started is not left running
            raise
        return cls(opened, log)

    def record(self, record: dict) -> None:
        """Log a ``metrics.jsonl`` record's numbers (``train`` and ``validation`` events; others are ignored)."""
        metrics = tracker_metrics(record)
        if not metrics or not self._logging:
            return
        timestamp = record.get("time", time.time())
        for tracker in list(self._logging):
            try:
                tracker.log_metrics(metrics, record["step"], timestamp)
            except Exception as err:  # a tracker must not end a training job
                self._logging.remove(tracker)
                self._log(f"warning: {tracker.title} logging failed ({type(err).__name__}: {err}); nothing more "
                          f"goes to {tracker.title} in this job")

    def finish(self, status: str, exit_code: int) -> None:
        """End every run (each once; an error is reported, not raised: it must not hide the job's outcome)."""
        trackers, self.trackers, self._logging = self.trackers, (), []
        for tracker in trackers:
            try:
                tracker.finish(status, exit_code)
            except Exception as err:
                self._log(f"warning: {tracker.title} run {tracker.run_id} could not be ended ({type(err).__name__}: "
                          f"{err})")

    def __enter__(self) -> "JobTrackers":
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        self.finish(*job_outcome(error))


def _start(name: str, settings, job_dir: Path, config: dict, run_id: Optional[str]) -> Tracker:
    try:
        return TRACKER_CLASSES[name](settings, job_dir, config, run_id)
    except Exception as err:
        raise TrackerError(f"logger.{name}: the {name} run could not start ({type(err).__name__}: {err}); check the "
                           f"logger.{name} settings and the tracker's environment variables, or set "
                           f"logger.{name}.enabled=false.") from err


def job_outcome(error: Optional[BaseException]) -> Tuple[str, int]:
    """``(status, exit code)`` of a job that ended with ``error`` (None: it completed)."""
    if error is None:
        return COMPLETED, 0
    if isinstance(error, JobCancelled):
        return CANCELLED, error.exit_code
    if isinstance(error, KeyboardInterrupt):  # a second stop signal: stopped at once
        return CANCELLED, 128 + signal.SIGINT
    return FAILED, 1


def tracker_metrics(record: dict) -> Dict[str, float]:
    """A record's numbers as tracker metrics: ``train/<key>``, or ``val/<key>`` with a ``val_`` prefix dropped."""
    prefix = _METRIC_PREFIX.get(record.get("event"))
    if prefix is None:
        return {}
    metrics = {}
    for key, value in record.items():
        if key in _NOT_METRICS or not isinstance(value, (int, float)):  # bool is an int: logged as 0 or 1
            continue
        name = key[len("val_"):] if prefix == "val/" and key.startswith("val_") else key
        metrics[prefix + name] = float(value)
    return metrics


def loggable_config(cfg: Config) -> dict:
    """The resolved config as nested dicts, without ``serving`` (the server's settings, not the job's)."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    tree.pop("serving", None)
    return tree


def _flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
    flat: Dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_run_ids(path: Path) -> Dict[str, str]:
    try:
        return {name: run_id for name, run_id in json.loads(path.read_text(encoding="utf-8")).items()
                if isinstance(run_id, str)}
    except (OSError, ValueError, AttributeError):
        return {}
