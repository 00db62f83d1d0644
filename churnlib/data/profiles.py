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

from churnlib.data.features import FeatureSpec

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


# integer-valued columns spanning at most this many values are counted by value (one bincount)
_HISTOGRAM_SPAN = 1 << 16


def _histogram(values: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """-> (the distinct values in order, their counts) when the values are integers over a short
    span (ages, tenures, counts: most columns of a customer table), else (None, None). Counting
    by value costs one pass; looking each value up among the cuts costs a search per value."""
    if not len(values):
        return None, None
    low, high = values.min(), values.max()
    if high - low >= _HISTOGRAM_SPAN or not np.array_equal(values, np.floor(values)):
        return None, None
    counts = np.bincount((values - low).astype(np.int64))
    present = np.flatnonzero(counts)
    return present + low, counts[present]


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
            cuts, deciles = np.asarray(p["cuts"]), np.asarray(p["deciles"])
            # values < cut i, and the decile bin of a value: how many decile edges are <= it
            distinct, counts = _histogram(values)
            if distinct is not None:  # counted by value: the cuts looked up among the distinct values
                upto = np.concatenate([[0], np.cumsum(counts)])
                entry["below"] = upto[np.searchsorted(distinct, cuts, side="left")].tolist()
                bins = np.bincount(np.searchsorted(deciles, distinct, side="right"), weights=counts,
                                   minlength=len(deciles) + 1).astype(np.int64)
            else:  # each value looked up: "cuts <= value" counted, then summed up (no sort)
                at_or_below = np.searchsorted(cuts, values, side="right")
                entry["below"] = np.cumsum(np.bincount(at_or_below, minlength=len(cuts) + 1))[: len(cuts)].tolist()
                bins = np.bincount(np.searchsorted(deciles, values, side="right"), minlength=len(deciles) + 1)
            entry["deciles"] = bins.tolist()
        else:
            entry["levels"] = np.bincount(values.astype(np.int64), minlength=len(p["levels"]))[: len(p["levels"])].tolist()
        out[name] = entry
    return out


def merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-batch counts of ``batch_counts`` into one."""
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
    """Population stability index of two share vectors (shares floored at 1e-4, so never infinite)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    return float(((a - e) * np.log(a / e)).sum())


def verdict(value: float, moderate: float, major: float) -> str:
    """``stable``, ``moderate`` or ``major`` for a PSI value and the two thresholds."""
    return "stable" if value < moderate else "moderate" if value < major else "major"


@dataclass
class FeatureDrift:
    """One feature's drift: PSI, KS, missing rates and the verdict."""
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
    """The one line a command prints about drift (the shifted features first)."""
    shifted = [d for d in drifts if d.verdict != "stable"]
    if not shifted:
        return f"drift: all {len(drifts)} features stable"
    parts = ", ".join(f"{d.feature} {d.verdict} (PSI {d.psi:.2f})" for d in sorted(shifted, key=lambda d: -d.psi))
    return f"drift: {len(shifted)} of {len(drifts)} features shifted: {parts}"


def dumps(profile: dict[str, Any]) -> str:
    """The profile as compact JSON (what is stored with the model)."""
    return json.dumps(profile, separators=(",", ":"))
