"""The MLflow pyfunc wrapper of ``ChurnPredictor`` (what ``mlflow.pyfunc.load_model`` returns).

Kept apart from ``churnlib.model`` so that processes that only score (Ray Data
actors, Serve replicas) never import MLflow.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

from churnlib.model.predictor import ChurnPredictor


class ChurnModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around ``ChurnPredictor``: raw customer records in, P(churn) and label out."""

    def load_context(self, context: Any) -> None:
        self._predictor = ChurnPredictor.from_dir(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self._predictor.predict(model_input)
