"""Evaluation plots (matplotlib, Agg): ROC, PR, calibration, confusion matrix, and the
decision's cumulative gains, lift and profit curves.

Each function takes what the evaluator already computed and returns a figure;
the caller logs it with ``figures.log_figure`` (which closes it). Curves are drawn
from at most ``MAX_POINTS`` points so a test set of millions of rows still
makes a small PNG.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from churnlib.decision.value import Decision, contact, ranking, value_curve
from churnlib.figures import pyplot

MAX_POINTS = 2000


def _thin(*arrays: np.ndarray) -> list[np.ndarray]:
    n = len(arrays[0])
    if n <= MAX_POINTS:
        return list(arrays)
    idx = np.unique(np.linspace(0, n - 1, MAX_POINTS).astype(np.int64))
    return [a[idx] for a in arrays]


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]):
    """curves: label -> (y, p, auc)."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, (y, p, auc) in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        fpr, tpr = _thin(fpr, tpr)
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]):
    """curves: label -> (y, p, average precision)."""
    from sklearn.metrics import precision_recall_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    base_rate = None
    for label, (y, p, ap) in curves.items():
        precision, recall, _ = precision_recall_curve(y, p)
        recall, precision = _thin(recall, precision)
        ax.step(recall, precision, where="post", label=f"{label} (AP {ap:.4f})")
        base_rate = float(np.mean(y))
    if base_rate is not None:
        ax.axhline(base_rate, ls="--", color="grey", lw=1, label=f"churn rate {base_rate:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def calibration_figure(tables: dict[str, list[dict[str, float]]]):
    """tables: label -> calibration rows (see ``metrics.calibration_table``)."""
    plt = pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for label, rows in tables.items():
        used = [r for r in rows if r["count"] > 0]
        ax.plot([r["mean_predicted"] for r in used], [r["observed_rate"] for r in used], marker="o", label=label)
        width = rows[0]["bin_high"] - rows[0]["bin_low"]
        hist.bar([r["bin_low"] for r in rows], [r["count"] for r in rows], width=width, align="edge", alpha=0.5, label=label)
    ax.set(ylabel="observed churn rate", title="Calibration (reliability diagram)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
    hist.set(xlabel="predicted P(churn)", ylabel="rows")
    fig.tight_layout()
    return fig


def confusion_figure(confusion: dict[str, Any], threshold: float):
    """The confusion matrix at the model's threshold, counts and shares."""
    plt = pyplot()
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(m, cmap="Blues")
    total = m.sum() or 1.0
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(m[i, j])}\n{m[i, j] / total:.1%}", ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks([0, 1], labels=["no churn", "churn"])
    ax.set_yticks([0, 1], labels=["no churn", "churn"])
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion matrix at P >= {threshold:g}")
    fig.tight_layout()
    return fig


def _cumulative_positives(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of customers contacted, churners among them) for the first k of the ranking, k = 0..n."""
    sorted_y = np.asarray(y, dtype=np.float64)[ranking(p)]
    n = len(sorted_y)
    return np.arange(n + 1) / max(n, 1), np.concatenate([[0.0], np.cumsum(sorted_y)])


def gains_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Cumulative gains: the share of all churners among the first x % of customers by risk.
    curves: label -> (y, p)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, (y, p) in curves.items():
        share, caught = _cumulative_positives(y, p)
        share, gain = _thin(share, caught / max(caught[-1], 1.0))
        ax.plot(share, gain, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="random order")
    for x in (0.05, 0.1, 0.2):
        ax.axvline(x, color="lightgrey", lw=0.8)
    ax.set(xlabel="share of customers contacted (highest risk first)", ylabel="share of churners reached",
           title="Cumulative gains", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def lift_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Lift: the churn rate among the first x % of customers by risk over the base rate."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, (y, p) in curves.items():
        share, caught = _cumulative_positives(y, p)
        k = np.arange(len(caught))
        base = caught[-1] / max(len(caught) - 1, 1)
        lift = np.divide(caught[1:] / k[1:], base) if base else np.zeros(len(k) - 1)
        share, lift = _thin(share[1:], lift)
        ax.plot(share, lift, label=label)
    ax.axhline(1.0, ls="--", color="grey", lw=1, label="random order")
    ax.axvline(0.1, color="lightgrey", lw=0.8)
    ax.set(xlabel="share of customers contacted (highest risk first)", ylabel="lift (churn rate / base rate)",
           title="Lift", xlim=(0, 1))
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def profit_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], decision: Decision, cuts: dict[str, float]):
    """Expected net value of contacting the first x % of customers by risk, per model, with each
    model's contact threshold (``cuts``: label -> P, inf for nobody), the best cut and the
    capacity marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    n = 1
    for i, (label, (y, p)) in enumerate(curves.items()):
        k, value = value_curve(p, y, decision)
        n = max(len(k) - 1, 1)
        cap = decision.limit(len(k) - 1)
        best = int(np.argmax(value[: (cap if cap is not None else len(value) - 1) + 1]))
        shares, values = _thin(k / n, value)
        line, = ax.plot(shares, values, label=label)
        threshold = cuts.get(label, np.inf)
        chosen = int(contact(p, threshold, decision).sum())
        at = f"P >= {threshold:.3g}" if np.isfinite(threshold) else "no cut"
        ax.plot([chosen / n], [value[chosen]], marker="o", color=line.get_color(), ls="none",
                label=f"{label}: {at}, {chosen} contacts, {value[chosen]:,.0f}")
        if i == 0:
            ax.plot([best / n], [value[best]], marker="*", ms=12, color=line.get_color(), ls="none",
                    label=f"{label}: best, {best} contacts, {value[best]:,.0f}")
    limit = decision.limit(n)
    if limit is not None:
        ax.axvline(limit / n, color="red", ls=":", lw=1.2, label=f"capacity {limit}")
    ax.axhline(0.0, color="grey", lw=1)
    ax.set(xlabel="share of customers contacted (highest risk first)", ylabel="expected net value",
           title="Profit curve", xlim=(0, 1))
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig
