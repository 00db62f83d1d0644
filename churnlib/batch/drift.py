"""``churn drift`` and the drift part of ``churn predict``: new data against a model's (or a table's) profile.

The counting and the comparison are in ``churnlib.data.profiles``; this module reads the
data, logs the per-feature PSI and KS, the verdicts and a plot to MLflow.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from churnlib import tracking
from churnlib.console import say as default_say
from churnlib.data.features import FeatureSpec, encode_columns
from churnlib.data.profiles import (
    FeatureDrift,
    batch_counts,
    compare,
    merge_counts,
    profile_from_dataset,
    summary_line,
)
from churnlib.data.sources import check_columns, read_raw, resolve_source
from churnlib.errors import DataError
from churnlib.figures import log_figure, pyplot
from churnlib.model import loading
from churnlib.runtime import ensure_ray, quiet_logs
from churnlib.tags import TAG_COMMAND, TAG_DRIFT_REFERENCE
from churnlib.tracking import metric_name

if TYPE_CHECKING:
    from churnlib.config import Config


def drift_figure(drifts: list[FeatureDrift], moderate: float, major: float):
    """Bar chart of each feature's PSI with the moderate and major thresholds drawn in."""
    plt = pyplot()

    ordered = sorted(drifts, key=lambda d: d.psi)
    colours = {"stable": "#228833", "moderate": "#ccbb44", "major": "#ee6677"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(ordered) + 1.8), sharey=True)
    names = [d.feature for d in ordered]
    ax.barh(names, [d.psi for d in ordered], color=[colours[d.verdict] for d in ordered])
    ax.axvline(moderate, ls="--", color="#ccbb44", lw=1)
    ax.axvline(major, ls="--", color="#ee6677", lw=1)
    ax.set(xlabel="PSI (population stability index)", title="Drift per feature")
    ax2.barh(names, [d.ks for d in ordered], color="#4477aa")
    ax2.set(xlabel="KS statistic (categorical: total variation)", title="Largest CDF gap")
    fig.tight_layout()
    return fig


def log_drift(drifts: list[FeatureDrift], moderate: float, major: float, prefix: str = "drift") -> None:
    """Drift metrics (<prefix>/psi_<feature>, <prefix>/ks_<feature>: a section of their own), the report JSON and the plot into the active MLflow run."""
    import mlflow

    metrics = {}
    for d in drifts:
        metrics[metric_name(f"{prefix}/psi_{d.feature}")] = d.psi
        metrics[metric_name(f"{prefix}/ks_{d.feature}")] = d.ks
    metrics[f"{prefix}/features_shifted"] = float(sum(d.verdict != "stable" for d in drifts))
    mlflow.log_metrics(metrics)
    mlflow.log_dict({"thresholds": {"psi_moderate": moderate, "psi_major": major},
                     "features": [d.to_dict() for d in drifts]}, f"{prefix}/report.json")
    fig = drift_figure(drifts, moderate, major)
    log_figure(fig, f"{prefix}/psi.png")


def drift_report(cfg: Config, reference: str, data_path: str, verbose: bool = False,
                 say: Callable[[str], None] = default_say) -> list[Any]:
    """``churn drift``: compare a table with a reference (a model URI carrying a profile, or a table)."""
    import mlflow

    quiet_logs(verbose)
    tracking.preflight(cfg)
    if reference.startswith(("runs:/", "models:/")):
        predictor = loading.load(reference).predictor
        spec, profile = predictor.spec, predictor.profile
        if profile is None:
            raise DataError(f"{reference} carries no training profile (trained before profiles were stored)")
    else:
        spec = FeatureSpec.from_config(cfg.features)
        ref_source = resolve_source(reference)
        ensure_ray(cfg.ray, verbose=verbose, workspace=cfg.workspace_path)
        profile = profile_from_dataset(_encoded(ref_source, spec), spec, cfg.drift.profile_rows,
                                                 seed=cfg.model.random_state)
    source = resolve_source(data_path)
    ensure_ray(cfg.ray, verbose=verbose, workspace=cfg.workspace_path)  # already up when the reference was a table; a no-op then
    counts = _count_table(source, spec, profile)
    drifts = compare(profile, counts, cfg.drift.psi_moderate, cfg.drift.psi_major)
    say(summary_line(drifts))
    tags = {TAG_COMMAND: "drift", TAG_DRIFT_REFERENCE: reference, "data.source": source.uri}
    with tracking.tracked_run(cfg, "drift", tags):
        mlflow.log_params({"reference": reference, "data": source.uri})
        log_drift(drifts, cfg.drift.psi_moderate, cfg.drift.psi_major)
    return drifts


def _encoded(source: Any, spec: Any):
    """The table as model-matrix rows (bad cells missing), without the target: for drift counts.

    Every row is kept (``flags`` 0): a drift reference describes the table as it is.
    """
    columns = check_columns(source, spec, need_target=False)

    def to_x(df: pd.DataFrame) -> dict[str, np.ndarray]:
        X, _, _ = encode_columns(df, spec)
        return {"X": X, "flags": np.zeros(len(X), dtype=np.uint8)}

    return read_raw(source, spec, columns, typed=False).map_batches(to_x, batch_format="pandas",
                                                                             batch_size=None)


def _count_table(source: Any, spec: Any, profile: dict[str, Any]) -> dict[str, Any]:
    def counts(batch: dict[str, np.ndarray]) -> pd.DataFrame:
        return pd.DataFrame({"c": [json.dumps(batch_counts(batch["X"], profile, spec))]})

    rows = _encoded(source, spec).map_batches(counts, batch_format="numpy", batch_size=None).take_all()
    return merge_counts([json.loads(r["c"]) for r in rows])
