"""Calibrated P(churn): the one place a booster's output becomes the probability everyone uses.

An expected value (``churnlib.decision``) is only right when P(churn) means what
it says. A booster stopped early by AUC on a small table, or one trained on
re-weighted classes, does not: its probabilities crowd toward 0.5 or drift off.
Training fits a calibrator on the validation rows (rows that did not grow the
trees) and stores it in the model's metadata; ``scores`` applies it, and the
pyfunc, batch scoring, evaluation and Serve all score through it.

- ``platt`` (default): P = sigmoid(a * margin + b), two numbers fitted by maximum
  likelihood with Platt's smoothed targets. It keeps the ranking (the AUC is
  unchanged) and SHAP values stay additive: the contributions scale by ``a`` and
  the base value becomes ``a * base + b`` (``calibrate_explanation``).
- ``isotonic``: a non-decreasing step function of the raw P, fitted by
  scikit-learn's pool-adjacent-violators, stored as its knots and applied by
  linear interpolation (clipped at the ends, kept within [1/(2n), 1 - 1/(2n)] so
  that log loss stays finite). More flexible, needs more rows, and ties scores
  within a step. Explanations stay in the booster's own log-odds.
- ``none``: the booster's own probability.

Fewer than ``MIN_ROWS`` validation rows, or a single class among them, leave the
model uncalibrated (``fit`` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("platt", "isotonic", "none")
MIN_ROWS = 50  # below this a calibrator fits noise
MIN_CLASS = 5  # ... and both classes need a few rows


def sigmoid(margin: np.ndarray) -> np.ndarray:
    m = np.asarray(margin, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-m))


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration: ``apply`` maps the booster's margins to calibrated P(churn)."""
    method: str
    rows: int
    a: float = 1.0  # platt
    b: float = 0.0
    knots_x: tuple[float, ...] = field(default=())  # isotonic: raw P -> calibrated P
    knots_y: tuple[float, ...] = field(default=())
    floor: float = 0.0

    def apply(self, margin: np.ndarray) -> np.ndarray:
        """Calibrated P(churn), float32 (as the booster's own probabilities)."""
        m = np.asarray(margin, dtype=np.float64)
        if self.method == "platt":
            p = sigmoid(self.a * m + self.b)
        else:
            p = np.interp(sigmoid(m), self.knots_x, self.knots_y)
            p = np.clip(p, self.floor, 1.0 - self.floor)
        return p.astype(np.float32)

    @property
    def additive(self) -> bool:
        """Whether SHAP values of the margin, rescaled, still add up to the calibrated log-odds."""
        return self.method == "platt"

    def to_dict(self) -> dict[str, Any]:
        if self.method == "platt":
            return {"method": "platt", "rows": self.rows, "a": self.a, "b": self.b}
        return {"method": "isotonic", "rows": self.rows, "x": list(self.knots_x), "y": list(self.knots_y),
                "floor": self.floor}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Calibrator | None":
        """The model's calibrator from its metadata (None: uncalibrated, or a model from before)."""
        if not d or d.get("method") in (None, "none"):
            return None
        if d["method"] == "platt":
            return cls("platt", int(d.get("rows", 0)), a=float(d["a"]), b=float(d["b"]))
        if d["method"] == "isotonic":
            return cls("isotonic", int(d.get("rows", 0)), knots_x=tuple(map(float, d["x"])),
                       knots_y=tuple(map(float, d["y"])), floor=float(d.get("floor", 0.0)))
        raise ValueError(f"unknown calibration method {d['method']!r} in the model's metadata")

    def describe(self) -> str:
        if self.method == "platt":
            return f"platt (P = sigmoid({self.a:.4f} x margin {self.b:+.4f}), {self.rows} rows)"
        return f"isotonic ({len(self.knots_x)} knots, {self.rows} rows)"


def scores(booster: Any, X: np.ndarray, calibrator: Calibrator | None) -> np.ndarray:
    """P(churn) of each row of the model matrix ``X``: the booster's, calibrated when the model is."""
    if len(X) == 0:
        return np.empty(0, dtype=np.float32)
    if calibrator is None:
        return booster.inplace_predict(X)
    return calibrator.apply(booster.inplace_predict(X, predict_type="margin"))


def _fit_platt(margin: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Maximum likelihood of sigmoid(a m + b) with Platt's targets ((n+ + 1)/(n+ + 2), 1/(n- + 2)), Newton steps."""
    pos = int(y.sum())
    neg = len(y) - pos
    t = np.where(y == 1, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))
    a, b = 1.0, 0.0

    def loss(a: float, b: float) -> float:
        z = a * margin + b
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    current = loss(a, b)
    for _ in range(100):
        p = sigmoid(a * margin + b)
        g = p - t
        w = p * (1.0 - p) + 1e-12
        grad = np.array([np.dot(g, margin), g.sum()])
        hess = np.array([[np.dot(w, margin * margin), np.dot(w, margin)], [np.dot(w, margin), w.sum()]])
        hess += 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:  # backtracking: a Newton step that does not lower the loss is shortened
            na, nb = a - scale * step[0], b - scale * step[1]
            new = loss(na, nb)
            if new <= current:
                break
            scale /= 2
        else:
            break
        done = abs(current - new) <= 1e-10 * max(1.0, abs(current))
        a, b, current = na, nb, new
        if done:
            break
    return float(a), float(b)


def fit(method: str, margin: np.ndarray, y: np.ndarray) -> tuple[Calibrator | None, str]:
    """The calibrator of ``method`` on these (margin, label) rows -> (calibrator or None, a note)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration {method!r} (known: {', '.join(METHODS)})")
    if method == "none":
        return None, "none (model.calibration)"
    margin = np.asarray(margin, dtype=np.float64)
    y = np.asarray(y, dtype=np.int8)
    n, pos = len(y), int(y.sum())
    if n < MIN_ROWS or min(pos, n - pos) < MIN_CLASS:
        return None, (f"skipped: {n} validation row(s), {pos} churner(s); {method} needs {MIN_ROWS} rows with "
                      f"{MIN_CLASS} of each class")
    if method == "platt":
        a, b = _fit_platt(margin, y)
        if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
            return None, f"skipped: Platt scaling found no increasing fit (a = {a:.4g}) on {n} rows"
        cal = Calibrator("platt", n, a=a, b=b)
    else:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        iso.fit(sigmoid(margin), y)
        cal = Calibrator("isotonic", n, knots_x=tuple(map(float, iso.X_thresholds_)),
                         knots_y=tuple(map(float, iso.y_thresholds_)), floor=0.5 / n)
    return cal, cal.describe()


def calibrate_explanation(expl: Any, calibrator: Calibrator | None) -> Any:
    """SHAP values of the calibrated log-odds: Platt's ``a`` scales the contributions and
    ``a * base + b`` is the base value, so they still add up to the probability answered.
    Isotonic or none: the booster's own log-odds, unchanged."""
    if calibrator is None or not calibrator.additive:
        return expl
    from dataclasses import replace

    return replace(expl, values=expl.values * calibrator.a, base_values=expl.base_values * calibrator.a + calibrator.b)


def reliability(p: np.ndarray, y: np.ndarray, bins: int) -> dict[str, float]:
    """Brier score and expected calibration error of probabilities ``p`` against labels ``y``:
    ECE = sum over ``bins`` equal-width bins of |sum of P - churners| / rows (as ``churn
    evaluate``'s streaming ``ece``)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(p) == 0:
        return {"brier": 0.0, "ece": 0.0}
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    gap = np.bincount(idx, weights=p, minlength=bins) - np.bincount(idx, weights=y, minlength=bins)
    return {"brier": float(((p - y) ** 2).mean()), "ece": float(np.abs(gap).sum() / len(p))}
