"""SHAP explanations in the units of the raw features.

Every raw column is ONE model feature (categoricals are XGBoost native
categoricals, not one-hot columns), so a contribution per model feature is
already a contribution per original column: nothing to fold back. Values are
in log-odds (the model's margin): ``base_value + sum(contributions) == margin``
for every explained row, whatever the explainer.

Explainers (``evaluation.shap.explainer_type``):

- ``tree`` (default): exact TreeSHAP through XGBoost's own ``pred_contribs``,
  the fastest exact method for trees on a CPU.
- ``exact``: shap's model-agnostic Exact explainer over a background sample
  (``evaluation.shap.background_samples`` rows), about 100x slower.
- ``tree_explainer``: ``shap.TreeExplainer`` (tree-path-dependent), which for
  XGBoost hands the same matrix to the same ``pred_contribs``: identical values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from churnlib.data.features import FeatureSpec
from churnlib.figures import pyplot

EXPLAINERS = ("tree", "exact", "tree_explainer")


@dataclass
class Explanation:
    """SHAP values of some rows (log-odds), with the base value, raw feature values and names."""
    values: np.ndarray  # (rows, features): contribution of each raw column, log-odds
    base_values: np.ndarray  # (rows,)
    X: np.ndarray  # (rows, features): the model matrix that was explained
    feature_names: list[str]
    kind: str

    @property
    def margin(self) -> np.ndarray:
        return self.base_values + self.values.sum(axis=1)

    def mean_abs(self) -> dict[str, float]:
        means = np.abs(self.values).mean(axis=0) if len(self.values) else np.zeros(len(self.feature_names))
        return {name: float(v) for name, v in zip(self.feature_names, means)}


def _dmatrix(X: np.ndarray, spec: FeatureSpec, nthread: int):
    import xgboost as xgb

    return xgb.DMatrix(
        X, feature_names=spec.feature_names, feature_types=spec.feature_types, enable_categorical=True, nthread=nthread
    )


def explain(
    booster: Any,
    X: np.ndarray,
    spec: FeatureSpec,
    kind: str = "tree",
    background: np.ndarray | None = None,
    nthread: int | None = None,
) -> Explanation:
    """Contributions of each raw feature to each row's margin (see the module doc)."""
    if kind not in EXPLAINERS:
        raise ValueError(f"unknown explainer {kind!r} (known: {', '.join(EXPLAINERS)})")
    threads = nthread or os.cpu_count() or 1
    X = np.asarray(X, dtype=np.float32)
    k = len(spec.feature_names)
    if len(X) == 0:
        return Explanation(np.empty((0, k)), np.empty(0), X, spec.feature_names, kind)
    if kind == "tree":
        contribs = booster.predict(_dmatrix(X, spec, threads), pred_contribs=True, validate_features=False)
        values, base = contribs[:, :-1], contribs[:, -1]
    elif kind == "tree_explainer":
        import shap

        explainer = shap.TreeExplainer(booster)
        values = np.asarray(explainer.shap_values(_dmatrix(X, spec, threads)))
        base = np.full(len(X), float(np.asarray(explainer.expected_value).reshape(-1)[0]))
    else:
        import shap

        if background is None or len(background) == 0:
            raise ValueError("the exact explainer needs background rows")
        bg = np.asarray(background, dtype=np.float32)

        def margin(Z: np.ndarray) -> np.ndarray:
            return booster.inplace_predict(np.asarray(Z, dtype=np.float32), predict_type="margin")

        masker = shap.maskers.Independent(bg, max_samples=len(bg))
        result = shap.explainers.Exact(margin, masker)(X, silent=True)
        values, base = np.asarray(result.values), np.asarray(result.base_values).reshape(-1)
    return Explanation(
        values=np.asarray(values, dtype=np.float64),
        base_values=np.asarray(base, dtype=np.float64),
        X=X,
        feature_names=spec.feature_names,
        kind=kind,
    )


def raw_values(X: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """The model matrix back in raw units: numbers, category strings, None for missing."""
    out = np.empty(X.shape, dtype=object)
    n_num = len(spec.numeric)
    for j in range(X.shape[1]):
        col = X[:, j]
        missing = np.isnan(col)
        if j < n_num:
            vals = [float(v) for v in col]
        else:
            levels = spec.levels(spec.feature_names[j])
            vals = [levels[int(v)] if not m else None for v, m in zip(col, missing)]
        out[:, j] = [None if m else v for v, m in zip(vals, missing)]
    return out


def top_reasons(expl: Explanation, spec: FeatureSpec, k: int = 3) -> list[list[dict[str, Any]]]:
    """Per row, the ``k`` largest contributions by size: feature, raw value, contribution."""
    raw = raw_values(expl.X, spec)
    order = np.argsort(-np.abs(expl.values), axis=1, kind="stable")[:, :k]
    return [
        [
            {"feature": expl.feature_names[j], "value": raw[i, j], "contribution": float(expl.values[i, j])}
            for j in order[i]
        ]
        for i in range(len(expl.values))
    ]


# Plots -----------------------------------------------------------------------------


def _shap_explanation(expl: Explanation, spec: FeatureSpec, rows: slice | np.ndarray | None = None):
    import shap

    idx = slice(None) if rows is None else rows
    return shap.Explanation(
        values=expl.values[idx],
        base_values=expl.base_values[idx],
        data=expl.X[idx].astype(np.float64),
        display_data=raw_values(expl.X[idx], spec),
        feature_names=expl.feature_names,
    )


def beeswarm_figure(expl: Explanation, spec: FeatureSpec):
    """Summary plot: every explained row, per feature (colour = feature value; category code for categoricals)."""
    plt = pyplot()
    import shap

    plt.figure()
    shap.plots.beeswarm(_shap_explanation(expl, spec), max_display=len(spec.feature_names), show=False)
    fig = plt.gcf()
    fig.suptitle(f"SHAP values ({expl.kind}), {len(expl.values)} rows, log-odds")
    fig.tight_layout()
    return fig


def bar_figure(mean_abs: dict[str, float]):
    """Mean absolute SHAP value per feature."""
    plt = pyplot()

    order = sorted(mean_abs, key=mean_abs.get)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(order) + 1.5))
    ax.barh(order, [mean_abs[f] for f in order], color="#4477aa")
    ax.set_xlabel("mean |SHAP value| (log-odds)")
    ax.set_title("Feature impact on churn predictions")
    fig.tight_layout()
    return fig


def waterfall_figure(expl: Explanation, spec: FeatureSpec, row: int, title: str):
    """One customer's prediction, feature by feature from the base value."""
    plt = pyplot()
    import shap

    plt.figure()
    shap.plots.waterfall(_shap_explanation(expl, spec)[row], max_display=len(spec.feature_names), show=False)
    fig = plt.gcf()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
