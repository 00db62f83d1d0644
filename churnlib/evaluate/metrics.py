"""Classification metrics for churn scores, streaming where the maths allows it.

Two kinds of metric, computed differently so a test set of tens of millions of
rows never has to sit on the driver as a table:

- **Sums** (``batch_sums`` per batch, ``merge_sums`` over batches): the
  confusion matrix at the decision threshold, log loss, Brier score, churn
  rates and the calibration bins. Each scoring batch reduces to a few dozen
  numbers; ``threshold_metrics`` turns the merged sums into accuracy,
  precision, recall, F1, ...
- **Rankings** (ROC AUC, PR AUC, the curves, the paired bootstrap): these need
  every score at once. Only the score and label columns reach the driver
  (5 bytes a row, 9 with a baseline model's scores), never the raw table.

PR AUC is average precision (scikit-learn's ``average_precision_score``): the
step-wise area that does not interpolate optimistically between points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Probabilities are clipped into [EPS, 1 - EPS] for log loss, as scikit-learn does.
EPS = float(np.finfo(np.float64).eps)


def batch_sums(p: np.ndarray, y: np.ndarray, threshold: float, bins: int) -> dict[str, Any]:
    """The sums one batch contributes: confusion counts, losses, calibration bins."""
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    pred = p >= threshold
    pos = y == 1
    pc = np.clip(p, EPS, 1 - EPS)
    logloss = -(y * np.log(pc) + (1 - y) * np.log1p(-pc))
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    return {
        "n": int(len(p)),
        "tp": int((pred & pos).sum()),
        "fp": int((pred & ~pos).sum()),
        "tn": int((~pred & ~pos).sum()),
        "fn": int((~pred & pos).sum()),
        "logloss_sum": float(logloss.sum()),
        "brier_sum": float(((p - y) ** 2).sum()),
        "p_sum": float(p.sum()),
        "bin_count": np.bincount(idx, minlength=bins).tolist(),
        "bin_p_sum": np.bincount(idx, weights=p, minlength=bins).tolist(),
        "bin_y_sum": np.bincount(idx, weights=y, minlength=bins).tolist(),
    }


def merge_sums(parts: list[dict[str, Any]], bins: int) -> dict[str, Any]:
    """Add one batch's streaming sums (confusion, losses, calibration bins) into the totals."""
    total: dict[str, Any] = {k: 0 for k in ("n", "tp", "fp", "tn", "fn")}
    total.update({"logloss_sum": 0.0, "brier_sum": 0.0, "p_sum": 0.0})
    for key in ("bin_count", "bin_p_sum", "bin_y_sum"):
        total[key] = np.zeros(bins, dtype=np.float64)
    for part in parts:
        for key in ("n", "tp", "fp", "tn", "fn", "logloss_sum", "brier_sum", "p_sum"):
            total[key] += part[key]
        for key in ("bin_count", "bin_p_sum", "bin_y_sum"):
            total[key] += np.asarray(part[key], dtype=np.float64)
    return total


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def threshold_metrics(s: dict[str, Any]) -> dict[str, float]:
    """Metrics that follow from the merged sums (no ranking needed)."""
    n, tp, fp, tn, fn = s["n"], s["tp"], s["fp"], s["tn"], s["fn"]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "log_loss": _ratio(s["logloss_sum"], n),
        "brier_score": _ratio(s["brier_sum"], n),
        "churn_rate_actual": _ratio(tp + fn, n),
        "churn_rate_predicted": _ratio(tp + fp, n),
        "mean_probability": _ratio(s["p_sum"], n),
        # expected calibration error: |mean predicted - observed rate| per bin, weighted by its rows
        "ece": _ratio(float(np.abs(np.asarray(s["bin_p_sum"]) - np.asarray(s["bin_y_sum"])).sum()), n),
    }


def calibration_table(s: dict[str, Any]) -> list[dict[str, float]]:
    """Reliability diagram rows: per probability bin, mean predicted and observed churn."""
    bins = len(s["bin_count"])
    out = []
    for i in range(bins):
        count = float(s["bin_count"][i])
        out.append(
            {
                "bin_low": i / bins,
                "bin_high": (i + 1) / bins,
                "count": count,
                "mean_predicted": _ratio(s["bin_p_sum"][i], count) if count else float("nan"),
                "observed_rate": _ratio(s["bin_y_sum"][i], count) if count else float("nan"),
            }
        )
    return out


def rank_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """ROC AUC and PR AUC (average precision); both need two classes."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {"roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p))}


# Paired bootstrap ----------------------------------------------------------------


class _WeightedAUC:
    """ROC AUC under per-row weights, O(n) per call after one sort.

    Rows are grouped by distinct score (ties count one half, as in the
    Mann-Whitney statistic). With all weights 1 this is exactly the ROC AUC.
    """

    def __init__(self, p: np.ndarray, y: np.ndarray):
        self.groups, self.inverse = np.unique(p, return_inverse=True)
        self.y = y.astype(np.float64)

    def __call__(self, w: np.ndarray) -> float:
        g = len(self.groups)
        pos = np.bincount(self.inverse, weights=w * self.y, minlength=g)
        neg = np.bincount(self.inverse, weights=w * (1.0 - self.y), minlength=g)
        below = np.cumsum(neg) - neg
        denom = pos.sum() * neg.sum()
        return float((pos * (below + 0.5 * neg)).sum() / denom) if denom else float("nan")


def _row_logloss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    pc = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


@dataclass
class Comparison:
    """Challenger minus baseline on the same rows, with paired bootstrap intervals."""

    auc_diff: float
    auc_ci: tuple[float, float]
    log_loss_diff: float
    log_loss_ci: tuple[float, float]
    verdict: str  # "better" | "worse" | "not significantly different"
    resamples: int
    rows: int
    confidence: float
    # expected net value per customer of each model's contacts (challenger - baseline), when given
    value_diff: float | None = None
    value_ci: tuple[float, float] | None = None

    @property
    def value_verdict(self) -> str | None:
        """"better" / "worse" / "not significantly different" in expected value per customer."""
        return verdict_from_ci(*self.value_ci) if self.value_ci is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "auc_diff": self.auc_diff,
            "auc_ci": list(self.auc_ci),
            "log_loss_diff": self.log_loss_diff,
            "log_loss_ci": list(self.log_loss_ci),
            "verdict": self.verdict,
            "resamples": self.resamples,
            "rows": self.rows,
            "confidence": self.confidence,
        }
        if self.value_ci is not None:
            out.update({"value_diff_per_customer": self.value_diff, "value_diff_ci": list(self.value_ci),
                        "value_verdict": self.value_verdict})
        return out


def verdict_from_ci(low: float, high: float) -> str:
    """For a difference where positive favours the challenger (AUC)."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not significantly different"


def paired_bootstrap(
    p_new: np.ndarray,
    p_base: np.ndarray,
    y: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_rows: int | None = None,
    value_rows: tuple[np.ndarray, np.ndarray] | None = None,
) -> Comparison:
    """Paired bootstrap of the AUC and log-loss differences (challenger - baseline).

    Each resample draws rows with replacement (as multinomial counts) and
    scores BOTH models on the same draw, so the interval reflects the
    difference, not the two models' separate noise. Above ``max_rows`` rows,
    a seeded subsample is resampled (a slightly wider, still honest interval).
    The verdict follows the AUC interval: above zero is better, below is worse.

    ``value_rows``: what each model's decision is worth per row (the row's value when the
    model contacts that customer, else 0; see ``churnlib.decision``); the same draws then
    give the interval of the difference in expected net value per customer.
    """
    rng = np.random.default_rng(seed)
    y = y.astype(np.float64)
    n_all = len(y)
    if max_rows is not None and n_all > max_rows:
        keep = np.sort(rng.choice(n_all, size=max_rows, replace=False))
        p_new, p_base, y = p_new[keep], p_base[keep], y[keep]
        if value_rows is not None:
            value_rows = (value_rows[0][keep], value_rows[1][keep])
    n = len(y)
    v_diff_rows = (np.asarray(value_rows[0], np.float64) - np.asarray(value_rows[1], np.float64)
                   if value_rows is not None else None)
    v_d = np.empty(resamples)
    auc_new, auc_base = _WeightedAUC(p_new, y), _WeightedAUC(p_base, y)
    ll_diff_rows = _row_logloss(p_new, y) - _row_logloss(p_base, y)
    ones = np.ones(n)
    point_auc = auc_new(ones) - auc_base(ones)
    point_ll = float(ll_diff_rows.mean())
    auc_d = np.empty(resamples)
    ll_d = np.empty(resamples)
    for i in range(resamples):
        w = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        auc_d[i] = auc_new(w) - auc_base(w)
        ll_d[i] = float((w * ll_diff_rows).sum() / n)
        if v_diff_rows is not None:
            v_d[i] = float((w * v_diff_rows).sum() / n)
    alpha = (1 - confidence) / 2
    auc_d = auc_d[~np.isnan(auc_d)]
    auc_ci = (float(np.quantile(auc_d, alpha)), float(np.quantile(auc_d, 1 - alpha))) if len(auc_d) else (float("nan"),) * 2
    ll_ci = (float(np.quantile(ll_d, alpha)), float(np.quantile(ll_d, 1 - alpha)))
    value_diff = value_ci = None
    if v_diff_rows is not None:
        value_diff = float(v_diff_rows.mean())
        value_ci = (float(np.quantile(v_d, alpha)), float(np.quantile(v_d, 1 - alpha)))
    return Comparison(
        value_diff=value_diff,
        value_ci=value_ci,
        auc_diff=float(point_auc),
        auc_ci=auc_ci,
        log_loss_diff=point_ll,
        log_loss_ci=ll_ci,
        verdict=verdict_from_ci(*auc_ci),
        resamples=resamples,
        rows=n,
        confidence=confidence,
    )
