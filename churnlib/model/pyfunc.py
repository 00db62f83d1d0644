"""The MLflow pyfunc wrapper of ``ChurnPredictor`` (what ``mlflow.pyfunc.load_model`` returns).

Kept apart from ``churnlib.model`` so that processes that only score (Ray Data
actors, Serve replicas) never import MLflow.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

from churnlib.errors import DataError, one_line
from churnlib.model.predictor import ChurnPredictor


class ChurnModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around ``ChurnPredictor``: raw customer records in, P(churn) and label out."""

    def load_context(self, context: Any) -> None:
        self._predictor = ChurnPredictor.from_dir(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """P(churn) and label per record. A record the model cannot take (an unknown category, a
        value that is not a number, a missing column) is MLflow's invalid-parameter error with
        `churn`'s one-line message: ``mlflow models serve`` answers it with a 400 and no stack trace."""
        try:
            return self._predictor.predict(model_input)
        except DataError as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(one_line(exc), error_code=INVALID_PARAMETER_VALUE) from None
