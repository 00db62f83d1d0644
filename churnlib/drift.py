"""Data drift: a compact profile of the training data, and how far new data has moved from it.

The **profile** (built at training, stored with the model as ``data_profile.json``)
holds, per feature, in the units of the model matrix:

- numeric: the 1st..99th percentiles of the training values (``cuts``, unique),
  the share of training rows below each cut, the decile cuts used for PSI and
  the share of training rows in each decile bin, and the missing rate;
- categorical: the share of each configured level, and the missing rate.

It is built from a seeded sample (``drift.profile_rows``, 100,000 rows by
default), a few kilobytes whatever the table's size.

**Comparison** (``churn predict`` and ``churn drift``) counts the new rows in
the same bins, batch by batch (sums, so any table size streams), then per
feature:

- PSI, population stability index, over the decile bins (numeric) or the
  levels (categorical), each with a "missing" bin: sum((a - e) * ln(a / e)),
  shares floored at 1e-4;
- KS, the Kolmogorov-Smirnov statistic: for numeric features, the largest gap
  between the training and new cumulative shares at the training percentiles
  (a binned KS, exact at those 99 points); for categorical features, the
  total variation distance, its analogue for unordered levels;
- a verdict from PSI: ``stable`` below ``drift.psi_moderate`` (0.1), ``moderate``
  below ``drift.psi_major`` (0.25), else ``major`` (the usual credit-scoring
  thresholds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from churnlib.features import FeatureSpec

PROFILE_FILE = "data_profile.json"
FLOOR = 1e-4


# The profile ------------------------------------------------------------------------------


def build_profile(X: np.ndarray, spec: FeatureSpec, rows_total: int | None = None) -> dict[str, Any]:
    """A profile of a sample of the model matrix (rows x spec.feature_names)."""
    X = np.asarray(X, dtype=np.float64)
    features: dict[str, Any] = {}
    n_num = len(spec.numeric)
    for j, name in enumerate(spec.feature_names):
        col = X[:, j]
        missing = np.isnan(col)
        values = col[~missing]
        entry: dict[str, Any] = {"missing": float(missing.mean()) if len(col) else 0.0}
        if j < n_num:
            if len(values):
                cuts = np.unique(np.percentile(values, np.arange(1, 100)))
                deciles = np.unique(np.percentile(values, np.arange(10, 100, 10)))
            else:
                cuts = deciles = np.empty(0)
            entry.update({
                "kind": "numeric",
                "cuts": cuts.tolist(),
                "below": [float((values < c).mean()) for c in cuts] if len(values) else [],
                "deciles": deciles.tolist(),
                "decile_shares": _shares(np.searchsorted(deciles, values, side="right"), len(deciles) + 1),
                "min": float(values.min()) if len(values) else None,
                "max": float(values.max()) if len(values) else None,
                "mean": float(values.mean()) if len(values) else None,
            })
        else:
            levels = list(spec.levels(name))
            entry.update({"kind": "categorical", "levels": levels,
                          "shares": _shares(values.astype(np.int64), len(levels))})
        features[name] = entry
    return {"rows_sampled": int(len(X)), "rows_total": int(rows_total if rows_total is not None else len(X)),
            "features": features}


def _shares(codes: np.ndarray, k: int) -> list[float]:
    counts = np.bincount(codes, minlength=k)[:k] if len(codes) else np.zeros(k)
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * k


def profile_from_dataset(ds: Any, spec: FeatureSpec, max_rows: int, seed: int = 0) -> dict[str, Any]:
    """Profile of a seeded sample of an encoded dataset (columns X and flags, see data.prepare)."""
    total = ds.count()
    fraction = min(1.0, max_rows / max(total, 1))
    sample = ds if fraction >= 1.0 else ds.random_sample(fraction, seed=seed)
    parts = []
    for batch in sample.select_columns(["X", "flags"]).iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(batch["X"][batch["flags"] == 0])
    X = np.concatenate(parts) if parts else np.empty((0, len(spec.feature_names)), dtype=np.float32)
    return build_profile(X[:max_rows], spec, rows_total=total)


# Counting new data, batch by batch ---------------------------------------------------------------


def batch_counts(X: np.ndarray, profile: dict[str, Any], spec: FeatureSpec) -> dict[str, Any]:
    """Counts of one batch of model-matrix rows in the profile's bins (sums across batches)."""
    out: dict[str, Any] = {"rows": int(len(X))}
    for j, name in enumerate(spec.feature_names):
        p = profile["features"].get(name)
        if p is None:
            continue
        col = np.asarray(X[:, j], dtype=np.float64)
        missing = np.isnan(col)
        values = col[~missing]
        entry = {"missing": int(missing.sum()), "present": int(len(values))}
        if p["kind"] == "numeric":
            cuts = np.asarray(p["cuts"])
            sorted_values = np.sort(values)
            entry["below"] = np.searchsorted(sorted_values, cuts, side="left").tolist()  # values < cut
            entry["deciles"] = np.bincount(np.searchsorted(np.asarray(p["deciles"]), values, side="right"),
                                           minlength=len(p["deciles"]) + 1).tolist()
        else:
            entry["levels"] = np.bincount(values.astype(np.int64), minlength=len(p["levels"]))[: len(p["levels"])].tolist()
        out[name] = entry
    return out


def merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"rows": 0}
    for part in parts:
        total["rows"] += part.get("rows", 0)
        for name, entry in part.items():
            if name == "rows":
                continue
            acc = total.setdefault(name, {})
            for key, value in entry.items():
                if isinstance(value, list):
                    acc[key] = (np.asarray(acc.get(key, np.zeros(len(value))), dtype=np.float64) + np.asarray(value)).tolist()
                else:
                    acc[key] = acc.get(key, 0) + value
    return total


# Comparing ---------------------------------------------------------------------------------------


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    return float(((a - e) * np.log(a / e)).sum())


def verdict(value: float, moderate: float, major: float) -> str:
    return "stable" if value < moderate else "moderate" if value < major else "major"


@dataclass
class FeatureDrift:
    feature: str
    kind: str
    psi: float
    ks: float
    verdict: str
    missing_reference: float
    missing_current: float
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def compare(profile: dict[str, Any], counts: dict[str, Any], moderate: float = 0.1, major: float = 0.25) -> list[FeatureDrift]:
    """Per feature: PSI, KS and a verdict (see the module doc)."""
    out = []
    for name, p in profile["features"].items():
        c = counts.get(name)
        if c is None:
            continue
        n = c["present"] + c["missing"]
        miss_cur = c["missing"] / n if n else 0.0
        miss_ref = p["missing"]
        present = max(c["present"], 1)
        if p["kind"] == "numeric":
            ref_bins = np.asarray(p["decile_shares"]) * (1 - miss_ref)
            cur_bins = np.asarray(c["deciles"], dtype=np.float64) / n if n else np.zeros(len(ref_bins))
            ks = float(np.max(np.abs(np.asarray(p["below"]) - np.asarray(c["below"]) / present))) if p["cuts"] else 0.0
            detail = {"reference_mean": p.get("mean"), "reference_range": [p.get("min"), p.get("max")]}
        else:
            ref_bins = np.asarray(p["shares"]) * (1 - miss_ref)
            cur_bins = np.asarray(c["levels"], dtype=np.float64) / n if n else np.zeros(len(ref_bins))
            ks = 0.5 * float(np.abs(np.asarray(p["shares"]) - np.asarray(c["levels"]) / present).sum())
            detail = {"levels": p["levels"], "reference_shares": p["shares"],
                      "current_shares": (np.asarray(c["levels"]) / present).tolist()}
        value = psi(np.append(ref_bins, miss_ref), np.append(cur_bins, miss_cur))
        out.append(FeatureDrift(name, p["kind"], value, ks, verdict(value, moderate, major), miss_ref, miss_cur, detail))
    return out


def summary_line(drifts: list[FeatureDrift]) -> str:
    shifted = [d for d in drifts if d.verdict != "stable"]
    if not shifted:
        return f"drift: all {len(drifts)} features stable"
    parts = ", ".join(f"{d.feature} {d.verdict} (PSI {d.psi:.2f})" for d in sorted(shifted, key=lambda d: -d.psi))
    return f"drift: {len(shifted)} of {len(drifts)} features shifted: {parts}"


def figure(drifts: list[FeatureDrift], moderate: float, major: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def log(drifts: list[FeatureDrift], moderate: float, major: float, prefix: str = "drift") -> None:
    """Drift metrics (psi_/ks_<feature>), the report JSON and the plot into the active MLflow run."""
    import matplotlib.pyplot as plt
    import mlflow

    from churnlib.evaluation import metric_name

    metrics = {}
    for d in drifts:
        metrics[metric_name(f"{prefix}_psi_{d.feature}")] = d.psi
        metrics[metric_name(f"{prefix}_ks_{d.feature}")] = d.ks
    metrics[f"{prefix}_features_shifted"] = float(sum(d.verdict != "stable" for d in drifts))
    mlflow.log_metrics(metrics)
    mlflow.log_dict({"thresholds": {"psi_moderate": moderate, "psi_major": major},
                     "features": [d.to_dict() for d in drifts]}, f"{prefix}/report.json")
    fig = figure(drifts, moderate, major)
    mlflow.log_figure(fig, f"{prefix}/psi.png")
    plt.close(fig)


def dumps(profile: dict[str, Any]) -> str:
    return json.dumps(profile, separators=(",", ":"))
