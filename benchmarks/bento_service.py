"""The BentoML peer of `benchmarks/serve_load.py`: the same booster and feature function, served
the way BentoML recommends for a CPU model (its docs: "Workers", "Adaptive batching").

    CHURN_BENTO_MODEL=<folder with booster.ubj and feature_spec.json> \\
        bentoml serve benchmarks.bento_service:ChurnModel --host 127.0.0.1 --port 3000

Runs in its own virtualenv (``--bentoml-python``; BentoML pins its own web stack), with this
repository on ``PYTHONPATH`` for ``churnlib.data.features`` only (pandas and numpy): raw JSON
records -> the model matrix exactly as our server builds it -> ``inplace_predict``.

- ``workers="cpu_count"``: one worker process per core, BentoML's advice for CPU-bound models;
  XGBoost one thread per worker (as our replicas);
- ``@bentoml.api(batchable=True)``: adaptive batching; every request is a list of records
  (one for a single customer), concatenated along it, up to ``max_batch_size`` records waiting
  at most ``max_latency_ms``;
- the answer: P(churn) per record (less than ours answers: no label, no decision, no log).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import bentoml

MAX_BATCH_SIZE = int(os.environ.get("CHURN_BENTO_MAX_BATCH", "1024"))
MAX_LATENCY_MS = int(os.environ.get("CHURN_BENTO_MAX_LATENCY_MS", "10000"))


@bentoml.service(workers="cpu_count", traffic={"timeout": 60})
class ChurnModel:
    def __init__(self) -> None:
        import xgboost as xgb

        from churnlib.data.features import FeatureSpec

        folder = Path(os.environ["CHURN_BENTO_MODEL"])
        self.booster = xgb.Booster(model_file=str(folder / "booster.ubj"))
        self.booster.set_param({"nthread": 1})
        self.spec = FeatureSpec.from_dict(json.loads((folder / "feature_spec.json").read_text()))

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, records: list[dict[str, Any]]) -> list[float]:
        from churnlib.data.features import to_matrix

        return self.booster.inplace_predict(to_matrix(records, self.spec)).tolist()
