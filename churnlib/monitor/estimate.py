"""Performance from the probabilities alone, before the outcomes are in (confidence-based estimation).

When the probabilities are calibrated (``churnlib.model.calibration``), a record
scored p is a churner with probability p. So, over a window of predictions, the
expected number of churners above a cut is the sum of their p, and of stayers
the sum of 1 - p: the expected ROC curve, hence the expected ROC AUC, the
expected accuracy at the label's threshold and the expected top-decile lift
follow without a single label (the idea of NannyML's CBPE). They are as right
as the calibration: on the generated table, calibrated by construction, the
estimate lands within 0.02 of the AUC realized once the outcomes arrive
(``tests/test_monitor.py``). When the estimate and the realized value part
ways, the calibration (or the world) has moved.

The realized metrics on the rows whose outcome is known sit beside them here,
so that both are computed the same way.
"""

from __future__ import annotations

import math

import numpy as np

from churnlib.decision.value import Decision, gains_and_lift, ranking


def _distinct_ends(sorted_desc: np.ndarray) -> np.ndarray:
    """Index of the last row of each run of equal scores in a descending array."""
    if len(sorted_desc) == 0:
        return np.empty(0, dtype=np.int64)
    change = np.flatnonzero(np.diff(sorted_desc) != 0)
    return np.append(change, len(sorted_desc) - 1)


def expected_roc_auc(p: np.ndarray) -> float:
    """The ROC AUC expected if each record churns with its probability: the area under the curve
    of expected true (sum of p) and false (sum of 1 - p) positives above each distinct score."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) < 2:
        return float("nan")
    ps = p[np.argsort(-p, kind="stable")]
    tp, fp = np.cumsum(ps), np.cumsum(1.0 - ps)
    if tp[-1] <= 0 or fp[-1] <= 0:
        return float("nan")
    ends = _distinct_ends(ps)
    tpr = np.concatenate([[0.0], tp[ends] / tp[-1]])
    fpr = np.concatenate([[0.0], fp[ends] / fp[-1]])
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))


def expected_accuracy(p: np.ndarray, threshold: float) -> float:
    """Expected share right at the label's threshold: p where labelled 1, 1 - p where labelled 0."""
    p = np.asarray(p, dtype=np.float64)
    return float(np.where(p >= threshold, p, 1.0 - p).mean()) if len(p) else float("nan")


def expected_top_decile_lift(p: np.ndarray) -> float:
    """Expected churn rate of the first tenth by score over the expected base rate."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0 or p.sum() <= 0:
        return float("nan")
    k = max(1, int(math.ceil(0.1 * len(p) - 1e-9)))
    return float(p[ranking(p)[:k]].mean() / p.mean())


def estimated(p: np.ndarray, threshold: float) -> dict[str, float]:
    """The estimated metrics of a window (no labels)."""
    return {"estimated_roc_auc": expected_roc_auc(p), "estimated_accuracy": expected_accuracy(p, threshold),
            "estimated_top_decile_lift": expected_top_decile_lift(p),
            "estimated_churn_rate": float(np.mean(p)) if len(p) else float("nan")}


def realized(p: np.ndarray, y: np.ndarray, threshold: float, contact: np.ndarray | None,
             decision: Decision | None) -> dict[str, float]:
    """The realized metrics of the rows whose outcome is known (both classes needed for the AUC):
    ROC AUC, log loss, accuracy, top-decile lift and the value the contacts realized."""
    from sklearn.metrics import log_loss, roc_auc_score

    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    out: dict[str, float] = {"realized_rows": float(len(y))}
    if len(y) == 0:
        return out
    out["realized_churn_rate"] = float(y.mean())
    out["realized_accuracy"] = float(((p >= threshold).astype(np.int64) == y).mean())
    if 0 < y.sum() < len(y):
        out["realized_roc_auc"] = float(roc_auc_score(y, p))
        out["realized_log_loss"] = float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]))
        out["realized_top_decile_lift"] = gains_and_lift(p, y, (0.1,))[0.1][1]
    if contact is not None and decision is not None:
        c = np.asarray(contact, dtype=bool)
        worth = y * decision.save_rate * decision.value_saved - decision.contact_cost
        out["realized_contacts"] = float(c.sum())
        out["realized_value_total"] = float(worth[c].sum())
    return out
