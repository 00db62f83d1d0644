"""Deployment gates: metric thresholds and "better than the champion".

``evaluation.thresholds`` maps a metric the evaluator computes to a minimum
(or, for the losses ``log_loss`` and ``brier_score``, a maximum). A threshold on
a metric nobody computes is refused when the config loads (see
``churnlib.config``), so no gate is ever silently skipped: every configured
threshold produces a check here, and a metric missing at evaluation time is a
failed check, not a pass.

The outcome is written as tags (``churn.gate.*``) on the evaluation run and on
the registry version evaluated; ``churn models promote`` reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from churnlib.config import EVAL_METRICS_LOWER_IS_BETTER
from churnlib.tags import TAG_GATE_PREFIX, TAG_GATE_STATUS, TAG_GATE_SUMMARY

PASSED, FAILED = "passed", "failed"


@dataclass
class Check:
    """One gate: the metric, its threshold, the value and whether it passed."""
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}: {PASSED if self.passed else FAILED} ({self.detail})"


@dataclass
class GateResult:
    """Every gate of an evaluation, its status and summary, and the tags that record it."""
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def status(self) -> str:
        return PASSED if self.passed else FAILED

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        if not self.checks:
            return "no gates configured"
        return "; ".join(c.line() for c in self.checks)

    def tags(self) -> dict[str, str]:
        tags = {TAG_GATE_STATUS: self.status, TAG_GATE_SUMMARY: self.summary()[:5000]}
        for c in self.checks:
            tags[f"{TAG_GATE_PREFIX}{c.name}"] = f"{PASSED if c.passed else FAILED}: {c.detail}"
        return tags

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [c.__dict__ for c in self.checks]}


def check_thresholds(metrics: dict[str, float], thresholds: dict[str, float]) -> list[Check]:
    """Refuse thresholds on metrics the evaluator does not compute (at config load)."""
    checks = []
    for name, limit in thresholds.items():
        value = metrics.get(name)
        if value is None or value != value:  # missing or NaN: never a pass
            checks.append(Check(name, False, f"not computed, limit {limit:g}"))
            continue
        if name in EVAL_METRICS_LOWER_IS_BETTER:
            ok, op = value <= limit, "<=" if value <= limit else ">"
        else:
            ok, op = value >= limit, ">=" if value >= limit else "<"
        checks.append(Check(name, bool(ok), f"{value:.4f} {op} {limit:g}"))
    return checks


def check_improvement(comparison: Any, baseline_label: str | None, first_model: bool) -> Check:
    """The challenger must be significantly better than the baseline (AUC, paired bootstrap)."""
    if comparison is None:
        if first_model:
            return Check("improvement", True, "no champion yet: first model")
        return Check("improvement", False, f"no comparison with a baseline ({baseline_label or 'none given'})")
    lo, hi = comparison.auc_ci
    detail = (
        f"{comparison.verdict} than {baseline_label}: AUC {comparison.auc_diff:+.4f}, "
        f"{comparison.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
    )
    return Check("improvement", comparison.verdict == "better", detail)


def evaluate_gates(
    metrics: dict[str, float],
    thresholds: dict[str, float],
    require_improvement: bool,
    comparison: Any = None,
    baseline_label: str | None = None,
    first_model: bool = False,
) -> GateResult:
    """Check each configured threshold (and the comparison, when required) against the metrics."""
    checks = check_thresholds(metrics, thresholds)
    if require_improvement:
        checks.append(check_improvement(comparison, baseline_label, first_model))
    return GateResult(checks)
