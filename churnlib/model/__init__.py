"""The model: its files, the predictor, the MLflow wrapper, packaging, loading, explanations, scoring."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Models logged while the pyfunc wrapper lived in the flat ``churnlib.model``
    # module unpickle ``churnlib.model.ChurnModel``: found here, lazily, so that
    # scoring processes that only need ChurnPredictor never import MLflow.
    if name == "ChurnModel":
        from churnlib.model.pyfunc import ChurnModel

        return ChurnModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
