"""What `churn train` did (``TrainResult``): light, so that a command that only prints it (the
CLI beside the workspace trainer, ``churnlib.train.warm``) imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainResult:
    """What `churn train` did: run, metrics, rounds, rows, restarts, timings, model URI."""
    run_id: str
    experiment_id: str
    model_uri: str
    booster_uri: str
    metrics: dict[str, float]
    best_iteration: int
    num_boosted_rounds: int
    rows: dict[str, int]
    timings: dict[str, float]
    data_digest: str
    restarts: int
    engine: str = "ray_train"  # where the boosting ran: "process", "task" (one Ray task) or "ray_train"
    extra: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] | None = None  # on the workspace trainer (churn up): its pid, whether it was warm

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "model_uri": self.model_uri,
            "booster_uri": self.booster_uri,
            "metrics": self.metrics,
            "best_iteration": self.best_iteration,
            "num_boosted_rounds": self.num_boosted_rounds,
            "rows": self.rows,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "data_digest": self.data_digest,
            "restarts": self.restarts,
            "engine": self.engine,
            **({"trainer": self.trainer} if self.trainer else {}),
        }
