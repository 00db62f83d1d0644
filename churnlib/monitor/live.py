"""Live drift in a Serve replica: the last N scored records against the model's training profile.

The request path only copies each request's model matrix and probabilities into
a ring buffer (``LiveWindow.add``: a numpy copy, no computation). A background
thread of the replica calls ``measure`` every ``monitoring.live_interval_s``:
PSI per feature of the window against the training profile (the same
``churnlib.data.profiles`` code as ``churn drift`` and ``churn monitor``) and
the window's score histogram, which the replica exports as Prometheus gauges.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from churnlib.data.profiles import batch_counts, compare

SCORE_BINS = 10


class LiveWindow:
    """The last ``size`` records a replica scored (matrix rows and probabilities)."""

    def __init__(self, n_features: int, size: int):
        self.size = size
        self._X = np.empty((size, n_features), dtype=np.float32)
        self._p = np.empty(size, dtype=np.float32)
        self._next = 0
        self._filled = 0
        self._lock = threading.Lock()

    def add(self, X: np.ndarray, p: np.ndarray) -> None:
        n = len(p)
        if n == 0:
            return
        if n >= self.size:
            X, p, n = X[-self.size:], p[-self.size:], self.size
        with self._lock:
            end = self._next + n
            if end <= self.size:
                self._X[self._next:end], self._p[self._next:end] = X, p
            else:
                first = self.size - self._next
                self._X[self._next:], self._p[self._next:] = X[:first], p[:first]
                self._X[: n - first], self._p[: n - first] = X[first:], p[first:]
            self._next = end % self.size
            self._filled = min(self.size, self._filled + n)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._X[: self._filled].copy(), self._p[: self._filled].copy()

    def __len__(self) -> int:
        return self._filled


def measure(window: LiveWindow, profile: dict[str, Any] | None, spec: Any, moderate: float, major: float,
            min_rows: int = 100) -> dict[str, Any]:
    """-> {"rows", "psi": {feature: PSI} (empty without a profile or with fewer than ``min_rows``),
    "score_shares": the share of the window per tenth of P(churn)}."""
    X, p = window.snapshot()
    out: dict[str, Any] = {"rows": len(p), "psi": {}, "score_shares": [0.0] * SCORE_BINS}
    if len(p):
        counts = np.histogram(p, bins=SCORE_BINS, range=(0.0, 1.0))[0]
        out["score_shares"] = (counts / len(p)).tolist()
    if profile is not None and len(p) >= min_rows:
        drifts = compare(profile, batch_counts(X, profile, spec), moderate, major)
        out["psi"] = {d.feature: d.psi for d in drifts}
    return out
