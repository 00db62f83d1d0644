"""Expected value of contacting customers, cuts, capacity, gains and lift.

The money model (``decision`` in the config):

- contacting a customer costs ``contact_cost``;
- a churner who is contacted stays with probability ``save_rate``, and then the
  business keeps ``value_saved`` (e.g. the margin over the horizon);
- a customer who would not have churned is worth nothing more for the contact.

So contacting a customer with P(churn) = p is worth, in expectation,
``p * save_rate * value_saved - contact_cost``: positive above the break-even
probability ``contact_cost / (save_rate * value_saved)`` when p is calibrated.
On labelled data the same contact is worth ``y * save_rate * value_saved -
contact_cost`` (``row_value``); summed over the customers a cut contacts, that is
the expected net value of the cut, which needs no calibration at all.

A cut at threshold t contacts every customer with p >= t; a capacity keeps only
the first K of them in the ranking (highest p first, ties in row order: the same
order everywhere, so the numbers are reproducible and a brute-force check finds
the same ones). Cuts are evaluated at every distinct score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from churnlib.config import DecisionConfig

# Shares of the base at which gains and lift are reported (5, 10 and 20 %).
LIFT_AT = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class Decision:
    """The money behind a contact: value kept when a churner is saved, cost of a contact,
    share of contacted churners who stay, and at most how many contacts a run may make."""

    value_saved: float
    contact_cost: float
    save_rate: float
    capacity: int | None = None
    capacity_share: float | None = None

    @classmethod
    def from_config(cls, d: DecisionConfig) -> "Decision":
        return cls(d.value_saved, d.contact_cost, d.save_rate, d.capacity, d.capacity_share)

    @property
    def break_even(self) -> float:
        """The calibrated P(churn) above which a contact pays for itself."""
        return self.contact_cost / (self.save_rate * self.value_saved)

    def limit(self, n: int) -> int | None:
        """At most this many contacts among ``n`` customers (None: no capacity): the smaller of
        ``capacity`` and ``capacity_share`` of ``n`` (rounded down)."""
        limits = []
        if self.capacity is not None:
            limits.append(int(self.capacity))
        if self.capacity_share is not None:
            limits.append(int(math.floor(self.capacity_share * n + 1e-9)))
        return min(limits) if limits else None

    def describe(self) -> str:
        cap = []
        if self.capacity is not None:
            cap.append(f"{self.capacity} contacts")
        if self.capacity_share is not None:
            cap.append(f"{self.capacity_share:.0%} of the customers")
        return (f"value saved {self.value_saved:g}, contact cost {self.contact_cost:g}, save rate {self.save_rate:g}"
                + (f", capacity {' or '.join(cap)}" if cap else ""))


def expected_value(p: np.ndarray, d: Decision) -> np.ndarray:
    """The expected net value of contacting each customer, from their P(churn)."""
    return np.asarray(p, dtype=np.float64) * (d.save_rate * d.value_saved) - d.contact_cost


def row_value(y: np.ndarray, d: Decision) -> np.ndarray:
    """What contacting each labelled customer is worth: a churner is saved with probability
    ``save_rate``; every contact costs ``contact_cost``."""
    return np.asarray(y, dtype=np.float64) * (d.save_rate * d.value_saved) - d.contact_cost


def ranking(p: np.ndarray) -> np.ndarray:
    """Row indices, highest P(churn) first, ties in row order."""
    return np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")


def contact(p: np.ndarray, threshold: float, d: Decision) -> np.ndarray:
    """Whom to contact: P(churn) >= ``threshold``, and only the first K in the ranking when a
    capacity of K applies. Expected value rises with p, so these are the top K by expected value."""
    p = np.asarray(p, dtype=np.float64)
    chosen = p >= threshold
    k = d.limit(len(p))
    if k is not None and int(chosen.sum()) > k:
        order = ranking(p)
        chosen = np.zeros(len(p), dtype=bool)
        chosen[order[:k]] = True
    return chosen


@dataclass
class Cut:
    """One cut: its threshold, how many it contacts and what that is worth on labelled data."""

    threshold: float
    contacts: int
    total: float
    per_customer: float

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "contacts": self.contacts, "total": self.total,
                "per_customer": self.per_customer}


def value_at(p: np.ndarray, y: np.ndarray, threshold: float, d: Decision) -> Cut:
    """The expected net value of the cut at ``threshold`` (capacity applied) on labelled data."""
    chosen = contact(p, threshold, d)
    total = float(row_value(np.asarray(y)[chosen], d).sum())
    return Cut(float(threshold), int(chosen.sum()), total, total / max(len(p), 1))


def value_curve(p: np.ndarray, y: np.ndarray, d: Decision) -> tuple[np.ndarray, np.ndarray]:
    """(k, value): the expected net value of contacting the first k customers of the ranking,
    for k = 0..n (no capacity applied; the caller stops at the capacity)."""
    order = ranking(p)
    v = row_value(np.asarray(y)[order], d)
    return np.arange(len(v) + 1), np.concatenate([[0.0], np.cumsum(v)])


def best_cut(p: np.ndarray, y: np.ndarray, d: Decision) -> Cut:
    """The threshold whose cut (capacity applied) is worth most on labelled data, over every
    distinct score; contacting nobody (worth 0) is a cut too, reported as threshold inf.

    Among equally good cuts the highest threshold (fewest contacts) wins."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    order = ranking(p)
    ps = p[order]
    _, cum = value_curve(p, y, d)
    # a cut at t = ps[k-1] contacts the first k rows, k at the end of each group of equal scores
    ends = np.flatnonzero(np.append(ps[1:] != ps[:-1], True)) + 1 if n else np.empty(0, dtype=np.int64)
    limit = d.limit(n)
    contacted = np.minimum(ends, limit) if limit is not None else ends
    values = cum[contacted]
    best_value, best_t, best_k = 0.0, math.inf, 0
    if len(values):
        i = int(np.argmax(values))  # the first maximum: the highest threshold
        if values[i] > 0:
            best_value, best_t, best_k = float(values[i]), float(ps[ends[i] - 1]), int(contacted[i])
    return Cut(best_t, best_k, best_value, best_value / max(n, 1))


def gains_and_lift(p: np.ndarray, y: np.ndarray, shares: tuple[float, ...] = LIFT_AT) -> dict[float, tuple[float, float]]:
    """share -> (gain, lift) of contacting the first ceil(share * n) customers of the ranking:
    the share of all churners they hold, and their churn rate over the base rate."""
    y = np.asarray(y, dtype=np.float64)
    n, positives = len(y), float(y.sum())
    sorted_y = y[ranking(p)]
    out = {}
    for share in shares:
        k = max(1, int(math.ceil(share * n - 1e-9)))
        caught = float(sorted_y[:k].sum())
        gain = caught / positives if positives else float("nan")
        lift = (caught / k) / (positives / n) if positives else float("nan")
        out[share] = (gain, lift)
    return out


def _pct(share: float) -> str:
    return f"{round(share * 100):d}pct"


def decision_metrics(p: np.ndarray, y: np.ndarray, threshold: float, d: Decision) -> dict[str, float]:
    """What ``churn evaluate`` reports of the decision, as flat metrics:

    - ``lift_at_{5,10,20}pct``, ``gain_at_...`` and ``top_decile_lift`` (= lift at 10 %);
    - ``expected_value_total`` / ``expected_value_per_customer`` / ``value_contacts`` at the
      threshold in force (``value_threshold``), capacity applied;
    - the same at P >= 0.5 (``value_at_half_*``) and at the best cut (``value_best_*``, with its
      threshold), of contacting everyone (``value_everyone_total``), and the break-even probability;
    - with a capacity K: ``precision_at_capacity`` and ``recall_at_capacity`` of the first K.
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(p)
    out: dict[str, float] = {}
    for share, (gain, lift) in gains_and_lift(p, y).items():
        out[f"gain_at_{_pct(share)}"] = gain
        out[f"lift_at_{_pct(share)}"] = lift
    out["top_decile_lift"] = out["lift_at_10pct"]
    chosen = value_at(p, y, threshold, d)
    out.update({"expected_value_total": chosen.total, "expected_value_per_customer": chosen.per_customer,
                "value_contacts": float(chosen.contacts)})
    if math.isfinite(threshold):  # absent when the model contacts nobody
        out["value_threshold"] = float(threshold)
    half = value_at(p, y, 0.5, d)
    out.update({"value_at_half_total": half.total, "value_at_half_per_customer": half.per_customer,
                "value_at_half_contacts": float(half.contacts)})
    best = best_cut(p, y, d)
    out.update({"value_best_total": best.total, "value_best_per_customer": best.per_customer,
                "value_best_contacts": float(best.contacts)})
    if best.contacts:  # absent when no cut pays (contacting nobody is best)
        out["value_best_threshold"] = best.threshold
    everyone = row_value(y, d)
    out["value_everyone_total"] = float(everyone.sum())  # contacting every customer, no capacity
    out["value_break_even"] = d.break_even
    k = d.limit(n)
    if k is not None:
        top = y[ranking(p)[:k]]
        positives = float(y.sum())
        out["precision_at_capacity"] = float(top.mean()) if k else 0.0
        out["recall_at_capacity"] = float(top.sum()) / positives if positives else float("nan")
        out["value_capacity"] = float(k)
    return out
