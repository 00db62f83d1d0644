"""What ``churn evaluate`` returns (and prints with ``--json``): metrics, confusion, comparison, gates, SHAP summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from churnlib.evaluate.metrics import Comparison


@dataclass
class EvaluationResult:
    """One evaluation: its run, the model and baseline, metrics, comparison, gates, SHAP, timings."""
    run_id: str
    experiment_id: str
    model_uri: str
    model_version: str | None
    training_run_id: str | None
    metrics: dict[str, float]
    confusion: dict[str, int]
    rows: dict[str, int]
    gate: Any  # GateResult
    baseline_uri: str | None = None
    baseline_version: str | None = None
    baseline_note: str | None = None
    baseline_metrics: dict[str, float] | None = None
    comparison: Comparison | None = None
    shap: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "model_uri": self.model_uri,
            "model_version": self.model_version,
            "training_run_id": self.training_run_id,
            "metrics": self.metrics,
            "confusion_matrix": self.confusion,
            "rows": self.rows,
            "gate": self.gate.to_dict(),
            "baseline": None
            if self.baseline_uri is None
            else {
                "uri": self.baseline_uri,
                "version": self.baseline_version,
                "note": self.baseline_note,
                "metrics": self.baseline_metrics,
                "comparison": self.comparison.to_dict() if self.comparison else None,
            },
            "shap": self.shap,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
