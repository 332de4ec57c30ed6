"""Pictures of a job, each only when its package is installed (``pip install 'nemo_customizer[plots]'``); without
it the job logs one line and goes on.

- ``loss.png`` (matplotlib): train and validation loss by step, the learning rate on a second axis, and below them
  the validation token accuracy when the job measures it (supervised jobs). Redrawn at each validation and when the
  job ends, written atomically (a viewer never reads half a PNG). Drawn with matplotlib's object API on an Agg
  canvas: the process-wide pyplot backend is left alone.
- TensorBoard scalars (``tensorboard``, through ``torch.utils.tensorboard``) in ``<job_dir>/tensorboard/``:
  ``train/loss``, ``val/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` and, when measured,
  ``val/mean_token_accuracy``.

Main rank only (``JobPlots(None, ...)`` does nothing). Drawing is best effort: an error is logged once, not raised.
"""

from __future__ import annotations

import importlib
import io
import sys
from typing import Callable, Dict, List, Optional

from nemo_customizer.jobs import JobDirectory

LOSS_PLOT = "loss.png"
TENSORBOARD_DIR = "tensorboard"
_TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                     "tokens_per_s": "train/tokens_per_s"}
"""train record key -> TensorBoard tag."""
_VALIDATION_TAGS = {"val_loss": "val/loss", "val_mean_token_accuracy": "val/mean_token_accuracy"}
"""validation record key -> TensorBoard tag."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class JobPlots:
    """A ``MetricsLog`` listener (``record``) drawing from the job status' series (``series()``); ``close()`` at the
    end draws the final picture and closes the TensorBoard file."""

    def __init__(self, job: Optional[JobDirectory], series: Callable[[], Dict[str, List[dict]]],
                 log: Callable[[str], None] = _stderr):
        self.job = job
        self._series = series
        self._log = log
        self._matplotlib_ok: Optional[bool] = None  # checked at the first drawing
        self._writer = None
        self._tensorboard_ok: Optional[bool] = None  # checked at the first record
        self._draw_failed = False

    def record(self, record: dict) -> None:
        if self.job is None:
            return
        event, step = record.get("event"), record.get("step")
        if event == "train":
            for key, tag in _TENSORBOARD_TAGS.items():
                if key in record:
                    self._scalar(tag, record[key], step)
        elif event == "validation":
            for key, tag in _VALIDATION_TAGS.items():
                if key in record:
                    self._scalar(tag, record[key], step)
            if self._writer is not None:
                self._writer.flush()
            self.draw()

    def draw(self) -> None:
        """Write ``loss.png`` from the current series (nothing without matplotlib or without points)."""
        if self.job is None or self._draw_failed:
            return
        series = self._series()
        if not (series.get("train_loss") or series.get("val_loss")) or not self._have_matplotlib():
            return
        try:
            png = loss_plot_png(series, title=self.job.path.name)
        except Exception as err:  # a picture must not end a training job
            self._draw_failed = True
            self._log(f"warning: {LOSS_PLOT} could not be drawn ({type(err).__name__}: {err}); no more plots")
            return
        if png is not None:
            self.job.write_atomic(LOSS_PLOT, png)

    def close(self) -> None:
        self.draw()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _have_matplotlib(self) -> bool:
        if self._matplotlib_ok is None:
            try:
                importlib.import_module("matplotlib")
                self._matplotlib_ok = True
            except ImportError:
                self._matplotlib_ok = False
                self._log(f"note: matplotlib is not installed, so no {LOSS_PLOT} "
                          "(pip install 'nemo_customizer[plots]')")
        return self._matplotlib_ok

    def _scalar(self, tag: str, value, step: int) -> None:
        if self._tensorboard_ok is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package
                self._writer = SummaryWriter(log_dir=str(self.job.path / TENSORBOARD_DIR))
                self._tensorboard_ok = True
            except ImportError:
                self._tensorboard_ok = False
                self._log("note: tensorboard is not installed, so no TensorBoard scalars "
                          "(pip install 'nemo_customizer[plots]')")
        if self._writer is not None and value is not None:
            self._writer.add_scalar(tag, value, step)


def loss_plot_png(series: Dict[str, List[dict]], title: str = "") -> Optional[bytes]:
    """PNG bytes of ``loss_figure``; None without loss points."""
    fig = loss_figure(series, title)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def loss_figure(series: Dict[str, List[dict]], title: str = ""):
    """A matplotlib ``Figure`` (on an Agg canvas) of train/validation loss by step with the learning rate on a
    second axis, and below it validation token accuracy when ``series`` has points of it; None without loss
    points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def xy(name):
        points = [p for p in series.get(name, []) if p.get("value") is not None]
        return [p["step"] for p in points], [p["value"] for p in points]

    train, val, lr = xy("train_loss"), xy("val_loss"), xy("lr")
    accuracy = xy("val_mean_token_accuracy")
    if not train[0] and not val[0]:
        return None
    fig = Figure(figsize=(8, 6.5 if accuracy[0] else 4.5), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    if accuracy[0]:
        ax, accuracy_axis = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        ax, accuracy_axis = fig.add_subplot(), None
    lines = ax.plot(*train, color="tab:blue", linewidth=1, label="train loss")
    lines += ax.plot(*val, "o-", color="tab:orange", markersize=4, label="validation loss")
    ax.set_xlabel("" if accuracy_axis is not None else "step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lr[0]:
        lr_axis = ax.twinx()
        lines += lr_axis.plot(*lr, "--", color="tab:gray", linewidth=1, label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    if title:
        ax.set_title(title)
    if accuracy_axis is not None:
        accuracy_axis.plot(*accuracy, "o-", color="tab:green", markersize=4, label="validation token accuracy")
        accuracy_axis.set_xlabel("step")
        accuracy_axis.set_ylabel("token accuracy")
        accuracy_axis.grid(alpha=0.3)
        accuracy_axis.legend(loc="lower right")
    return fig
