"""Multirun (``-m``): one training job per combination of swept values, one after another, then a results table.

``python -m nemo_customizer -m hyperparameters.learning_rate=1e-4,3e-4 hyperparameters.lora.adapter_dim=8,16``
reads the overrides with Hydra's parser (``a,b``, ``choice(a,b)``, ``range(1,4)``; an ``interval`` needs an
optimizer, not a sweep) and takes their product in Hydra's order: the first swept key varies slowest. Every job is
composed and checked before the first starts. Each trains in this process in turn (on GPUs: on the same GPUs,
under the same launcher), in ``<output_dir>/<number>_<key>=<value>,...``. A failed job is recorded and the sweep
goes on; a cancelled one (SIGINT, SIGTERM, ``cancel``) stops it. After each job the table of every job's swept
settings, status and best validation loss is rewritten to ``<output_dir>/sweep.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import Config, ConfigError, ConfigSearch, compose_config

TABLE_FILE = "sweep.csv"
NAME_LIMIT = 120  # characters of a job directory's name (the settings are in the table and its config.yaml)
COMPLETED, FAILED, CANCELLED, NOT_RUN = "completed", "failed", "cancelled", "not run"
_USER_INPUT_ERRORS = (ValueError, FileExistsError, PermissionError)  # config and data errors, output_dir refusals


@dataclasses.dataclass(frozen=True)
class SweepJob:
    """One combination: its swept settings and the composed config (``output_dir`` is the job's own folder)."""

    number: int
    settings: tuple[tuple[str, str], ...]
    """``(key, value)`` of each swept key, the value as written on the command line."""
    cfg: Config

    @property
    def label(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.settings)


@dataclasses.dataclass(frozen=True)
class SweepRow:
    """A job's line in the table."""

    job: SweepJob
    status: str = NOT_RUN
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class Sweep:
    directory: Path
    """The ``output_dir`` the config gives: each job's folder is in it, and the table."""
    keys: tuple[str, ...]
    jobs: tuple[SweepJob, ...]

    @property
    def table_path(self) -> Path:
        return self.directory / TABLE_FILE


def plan_sweep(overrides: Sequence[str], search: ConfigSearch, check: Callable[[Config], None]) -> Sweep:
    """Expand ``overrides`` into jobs, each composed and passed to ``check`` (which raises ``ConfigError``), before
    any job runs. A config mistake in any combination is raised naming the combination."""
    fixed, swept = _split_overrides(overrides)
    keys = tuple(key for key, _ in swept)
    combinations = list(itertools.product(*(values for _, values in swept)))
    jobs, directory = [], None
    for number, values in enumerate(combinations):
        settings = tuple(zip(keys, values))
        label = " ".join(f"{k}={v}" for k, v in settings)
        try:
            cfg = compose_config([*fixed, *(f"{k}={v}" for k, v in settings)], search=search)
            directory = Path(cfg.output_dir)
            cfg = dataclasses.replace(cfg, output_dir=str(directory / _job_name(number, settings)))
            check(cfg)
        except (ConfigError, FileExistsError, PermissionError) as exc:
            raise type(exc)(f"sweep job {number} ({label}): {exc}") from None
        jobs.append(SweepJob(number, settings, cfg))
    assert directory is not None
    return Sweep(directory, keys, tuple(jobs))


def run_sweep(sweep: Sweep, run: Callable[[Config], object], *, is_main: bool = True,
              log: Callable[[str], None] = print) -> list[SweepRow]:
    """Run each job of ``sweep`` with ``run`` (``api.run``), in order; the table is rewritten after each.

    A finished job (its folder has ``result.json``, from an earlier run of this sweep) is listed from it and not
    run again; an unfinished one resumes from its last checkpoint, as ``run`` does. A job that raises is recorded
    as failed and the next one starts; ``JobCancelled`` stops the sweep (the table says which jobs did not run) and
    is raised again.
    """
    from .jobs import RESULT_FILE
    from .training.status import JobCancelled

    rows = [SweepRow(job) for job in sweep.jobs]
    for index, job in enumerate(sweep.jobs):
        log(f"sweep job #{job.number} ({index + 1} of {len(sweep.jobs)}): {job.label or '(nothing swept)'} -> "
            f"{job.cfg.output_dir}")
        finished = Path(job.cfg.output_dir, RESULT_FILE)
        try:
            if finished.is_file():
                log(f"sweep job #{job.number}: finished earlier ({finished}), not run again")
                rows[index] = _row(job, json.loads(finished.read_text()))
            else:
                rows[index] = _row(job, dataclasses.asdict(run(job.cfg)))
        except JobCancelled as cancelled:
            rows[index] = SweepRow(job, CANCELLED, error=str(cancelled))
            if is_main:
                write_table(sweep, rows)
            raise
        except Exception as exc:  # noqa: BLE001 - one job's failure is its row; the sweep goes on
            rows[index] = SweepRow(job, FAILED, error=_one_line(exc))
            if not isinstance(exc, _USER_INPUT_ERRORS):  # a bug or a crash: its traceback is wanted
                log(traceback.format_exc().rstrip())
            log(f"sweep job #{job.number} failed: {_one_line(exc)}")
        if is_main:
            write_table(sweep, rows)
    return rows


def write_table(sweep: Sweep, rows: Sequence[SweepRow]) -> Path:
    """``<output_dir>/sweep.csv``: job, its folder, each swept key, status, best validation loss and step, error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["job", "job_dir", *sweep.keys, "status", "best_val_loss", "best_step", "error"])
    for row in rows:
        writer.writerow([row.job.number, row.job.cfg.output_dir, *(v for _, v in row.job.settings), row.status,
                         "" if row.best_val_loss is None else row.best_val_loss,
                         "" if row.best_step is None else row.best_step, row.error])
    sweep.directory.mkdir(parents=True, exist_ok=True)
    from .jobs import write_file_atomic

    write_file_atomic(sweep.table_path, buffer.getvalue())
    return sweep.table_path


def format_table(sweep: Sweep, rows: Sequence[SweepRow]) -> str:
    """The table as aligned text: job number, each swept key, status, best validation loss and its step."""
    header = ("job", *sweep.keys, "status", "best_val_loss", "best_step")
    lines = [header] + [(str(r.job.number), *(v for _, v in r.job.settings), r.status, _loss(r.best_val_loss),
                         "-" if r.best_step is None else str(r.best_step)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The overrides every job shares, and each swept key with its values in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"cannot parse override: {str(exc).strip().splitlines()[0]}") from None
    fixed, swept = [], []
    for override in parsed:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        if not override.is_discrete_sweep():
            raise ConfigError(f"{override.input_line}: a sweep takes a list of values (a,b or choice(a,b) or "
                              "range(start,stop,step)); an interval is for an optimizer.")
        if override.key_or_group == "output_dir":
            raise ConfigError(f"{override.input_line}: output_dir cannot be swept; each job of a sweep gets its "
                              "own folder inside output_dir.")
        swept.append((override.get_key_element(), list(override.sweep_string_iterator())))
    return fixed, swept


def _job_name(number: int, settings: Sequence[tuple[str, str]]) -> str:
    """``3_learning_rate=3e-4,adapter_dim=16``: the number keeps names unique, the last part of each key and its
    value say which job it is."""
    parts = ",".join(f"{key.lstrip('+~').rsplit('.', 1)[-1]}={value}" for key, value in settings)
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"{number}_{parts}" if parts else str(number))
    return name[:NAME_LIMIT]


def _row(job: SweepJob, result: dict) -> SweepRow:
    status = result.get("status", COMPLETED)
    loss = result.get("best_val_loss")
    return SweepRow(job, status, float(loss) if loss is not None else None, result.get("best_step"))


def _loss(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def is_main_process() -> bool:
    """Global rank 0 under a launcher (or no launcher): the process that prints and writes the table."""
    return int(os.environ.get("RANK", "0")) == 0
