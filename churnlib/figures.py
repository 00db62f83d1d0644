"""Figure set-up in one place: matplotlib's non-interactive Agg backend, imported only when a plot is made.

Plots are written to files and MLflow artifacts, never shown: Agg needs no
display (servers, Ray workers, CI) and selecting it here, once, before pyplot
is first imported, keeps a notebook's or a user's backend choice out of the way
of the library's plots and the library's choice out of ``churn --help``.
"""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_figure(fig: Any, artifact_file: str, run_id: str | None = None, client: Any = None) -> None:
    """Log ``fig`` as an MLflow artifact (to ``run_id`` through ``client``, else the active run) and close it."""
    import mlflow

    try:
        if run_id is None:
            mlflow.log_figure(fig, artifact_file)
        else:
            (client or mlflow.MlflowClient()).log_figure(run_id, fig, artifact_file)
    finally:
        pyplot().close(fig)
