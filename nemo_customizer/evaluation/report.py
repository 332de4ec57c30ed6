"""An evaluation's results: the base and/or customized model side by side, as a table, JSON and a bar chart."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_customizer.evaluation.runner import ModelEvaluation


@dataclass(frozen=True)
class EvaluationReport:
    """What ``evaluate()`` (or a job's evaluation) measured."""

    dataset: str
    format: str
    metrics: tuple[str, ...]
    rows: int
    references: list[str] = field(default_factory=list)
    """Each row's reference answer (the completion, or the last assistant message's content)."""
    base: Optional[ModelEvaluation] = None
    customized: Optional[ModelEvaluation] = None
    adapter: Optional[str] = None
    """The adapter (or fine-tuned model folder) evaluated as ``customized``."""

    @property
    def models(self) -> list[ModelEvaluation]:
        return [m for m in (self.base, self.customized) if m is not None]

    def table(self) -> str:
        """Metric rows, one column per model (and the change when both were evaluated)."""
        names = [m.model for m in self.models]
        header = ["metric", *names] + (["change"] if len(names) == 2 else [])
        lines = [header]
        for metric in self.metrics:
            values = [m.metrics.get(metric) for m in self.models]
            row = [metric, *(_number(v) for v in values)]
            if len(values) == 2 and None not in values:
                row.append(f"{values[1] - values[0]:+.4g}")
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [f"{self.dataset}: {self.rows} rows ({self.format})"]
        text += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        return "\n".join(text)

    def summary(self) -> dict[str, Any]:
        """The metrics only (for status.json, metrics.jsonl and results): ``{"base": {...}, "customized": {...}}``."""
        return {m.model: dict(m.metrics) for m in self.models}

    def to_json(self) -> dict[str, Any]:
        """Everything, the answers row by row included."""
        rows = []
        for index in range(self.rows):
            row: dict[str, Any] = {"index": index, "reference": self.references[index] if self.references else None}
            for m in self.models:
                row[m.model] = m.predictions[index]
                if m.predicted_calls is not None:
                    row[f"{m.model}_tool_calls"] = m.predicted_calls[index]
            rows.append(row)
        return {
            "dataset": self.dataset, "format": self.format, "rows": self.rows, "adapter": self.adapter,
            "metrics": self.summary(),
            "seconds": {m.model: round(m.seconds, 3) for m in self.models},
            "details": {m.model: m.details for m in self.models},
            "predictions": rows,
        }

    def plot_png(self) -> Optional[bytes]:
        """A bar chart of each metric, base beside customized; None without matplotlib (the ``plots`` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        shown = [metric for metric in self.metrics if metric != "perplexity"]  # its scale dwarfs the rest
        figure, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown) + 1, 3), squeeze=False)
        for axis, metric in zip(axes[0], shown):
            values = [m.metrics.get(metric, float("nan")) for m in self.models]
            axis.bar([m.model for m in self.models], values, color=["#999999", "#76b900"][-len(values):])
            axis.set_ylim(0, 1.1 * max([v for v in values if v == v] + [1.0]))  # shares (0..1) on a full axis
            axis.set_title(metric, fontsize=9)
            axis.tick_params(labelsize=8)
        figure.suptitle(f"held-out evaluation ({self.rows} rows)", fontsize=10)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        return buffer.getvalue()


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"
