"""The retention decision's arithmetic (churnlib.decision.value) against brute force.

Scores come from a real model on the real Telco table (a logistic regression on its
numeric columns, fitted here in a second: the arithmetic only needs scores and
labels); the brute force is plain Python over sorted lists, written apart from the
numpy code it checks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from churnlib.config import load_config
from churnlib.decision.value import (
    Decision,
    best_cut,
    contact,
    decision_metrics,
    expected_value,
    gains_and_lift,
    value_at,
)
from churnlib.errors import ConfigError
from tests.conftest import REPO, TELCO, require_shared

pytestmark = pytest.mark.unit

D = Decision(value_saved=500.0, contact_cost=25.0, save_rate=0.25)


@pytest.fixture(scope="module")
def telco_scores() -> tuple[np.ndarray, np.ndarray]:
    """Held-out scores and labels on the Telco table (30 % of its 7,043 customers)."""
    from sklearn.linear_model import LogisticRegression

    df = pd.read_csv(require_shared(TELCO))
    X = pd.DataFrame({
        "tenure": df["tenure"].astype(float),
        "MonthlyCharges": df["MonthlyCharges"].astype(float),
        "TotalCharges": pd.to_numeric(df["TotalCharges"], errors="coerce").fillna(0.0),
        "monthly": (df["Contract"] == "Month-to-month").astype(float),
        "fiber": (df["InternetService"] == "Fiber optic").astype(float),
    }).to_numpy()
    y = (df["Churn"] == "Yes").to_numpy().astype(np.int8)
    rng = np.random.default_rng(0)
    test = rng.random(len(y)) < 0.3
    model = LogisticRegression(max_iter=2000).fit(X[~test], y[~test])
    p = model.predict_proba(X[test])[:, 1].astype(np.float32)  # float32, as scoring returns them
    p = np.round(p, 3)  # ties, as real scores have them
    return p, y[test]  # int8, as evaluation collects them


def _brute_order(p) -> list[int]:
    return sorted(range(len(p)), key=lambda i: (-float(p[i]), i))


def _brute_value(p, y, t, d: Decision) -> tuple[int, float]:
    eligible = [i for i in _brute_order(p) if float(p[i]) >= t]
    k = d.limit(len(p))
    chosen = eligible if k is None else eligible[:k]
    return len(chosen), sum(float(y[i]) * d.save_rate * d.value_saved - d.contact_cost for i in chosen)


def test_gains_and_lift_equal_brute_force_on_telco(telco_scores):
    p, y = telco_scores
    order = _brute_order(p)
    churners = sum(int(v) for v in y)
    base = churners / len(y)
    for share, (gain, lift) in gains_and_lift(p, y).items():
        k = math.ceil(share * len(p))
        caught = sum(int(y[i]) for i in order[:k])
        assert gain == pytest.approx(caught / churners, abs=1e-12)
        assert lift == pytest.approx((caught / k) / base, abs=1e-12)
    m = decision_metrics(p, y, 0.5, D)
    assert m["top_decile_lift"] == m["lift_at_10pct"] > 2.0  # a real model ranks churners first
    assert 0 < m["gain_at_5pct"] < m["gain_at_10pct"] < m["gain_at_20pct"] < 1


@pytest.mark.parametrize("capacity", [None, 50, 400])
def test_best_cut_is_the_best_of_every_distinct_cut(telco_scores, capacity):
    p, y = telco_scores
    d = Decision(500.0, 25.0, 0.25, capacity=capacity)
    best = best_cut(p, y, d)
    brute = max([(0.0, math.inf, 0)] + [(v, t, k) for t in set(map(float, p)) for k, v in [_brute_value(p, y, t, d)]],
                key=lambda r: (r[0], r[1]))
    assert best.total == pytest.approx(brute[0], abs=1e-6) and best.contacts == brute[2]
    assert best.threshold == pytest.approx(brute[1])
    assert best.total > 0 and best.per_customer == pytest.approx(best.total / len(p))
    if capacity:
        assert best.contacts <= capacity
    # the value at the best threshold, computed as any cut is, is the same number
    again = value_at(p, y, best.threshold, d)
    assert again.total == pytest.approx(best.total) and again.contacts == best.contacts


@pytest.mark.parametrize(("capacity", "share"), [(1, None), (100, None), (10_000, None), (None, 0.05), (300, 0.05)])
def test_capacity_yields_exactly_min_of_capacity_and_eligible(telco_scores, capacity, share):
    p, y = telco_scores
    d = Decision(500.0, 25.0, 0.25, capacity=capacity, capacity_share=share)
    limit = min(x for x in (capacity, math.floor(share * len(p)) if share else None) if x is not None)
    for t in (0.05, 0.3, 0.5, 0.9):
        eligible = int((p >= t).sum())
        chosen = contact(p, t, d)
        assert int(chosen.sum()) == min(limit, eligible)
        if eligible > limit:  # the highest scores are the ones kept
            assert p[chosen].min() >= p[~chosen & (p >= t)].max()
        assert value_at(p, y, t, d).total == pytest.approx(_brute_value(p, y, t, d)[1], abs=1e-6)


def test_expected_value_and_break_even():
    assert D.break_even == pytest.approx(0.2)
    ev = expected_value(np.array([0.0, 0.2, 1.0]), D)
    assert ev.tolist() == pytest.approx([-25.0, 0.0, 100.0])


def test_no_cut_pays_when_contacts_cost_more_than_any_save(telco_scores):
    p, y = telco_scores
    d = Decision(value_saved=10.0, contact_cost=25.0, save_rate=0.5)
    best = best_cut(p, y, d)
    assert (best.contacts, best.total, best.threshold) == (0, 0.0, math.inf)
    m = decision_metrics(p, y, 0.5, d)
    assert "value_best_threshold" not in m and m["value_best_total"] == 0.0 and m["expected_value_total"] < 0


def test_metrics_at_capacity(telco_scores):
    p, y = telco_scores
    d = Decision(500.0, 25.0, 0.25, capacity=200)
    m = decision_metrics(p, y, 0.5, d)
    top = _brute_order(p)[:200]
    assert m["precision_at_capacity"] == pytest.approx(sum(int(y[i]) for i in top) / 200)
    assert m["recall_at_capacity"] == pytest.approx(sum(int(y[i]) for i in top) / sum(int(v) for v in y))
    assert m["value_contacts"] <= 200 and m["value_capacity"] == 200
    assert "precision_at_capacity" not in decision_metrics(p, y, 0.5, D)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("decision.contact_cost", -1, "decision.contact_cost: Input should be greater than or equal to 0"),
    ("decision.save_rate", 0, "decision.save_rate: Input should be greater than 0"),
    ("decision.save_rate", 1.5, "decision.save_rate: Input should be less than or equal to 1"),
    ("decision.capacity", 0, "decision.capacity: Input should be greater than or equal to 1"),
    ("decision.capacity_share", 0, "decision.capacity_share: Input should be greater than 0"),
    ("decision.value_saved", 0, "decision.value_saved: Input should be greater than 0"),
])
def test_bad_decision_settings_are_one_line_naming_the_key(key, value, says):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: value}, env={})
    assert says in str(err.value) and "\n" not in str(err.value)


def test_gates_accept_the_decision_metrics():
    cfg = load_config(overrides={"evaluation.thresholds": {"top_decile_lift": 2.0, "ece": 0.05,
                                                            "expected_value_per_customer": 1.0}}, env={})
    assert set(cfg.evaluation.thresholds) == {"top_decile_lift", "ece", "expected_value_per_customer"}
    from churnlib.evaluate.gates import check_thresholds

    checks = {c.name: c for c in check_thresholds({"top_decile_lift": 2.5, "ece": 0.08,
                                                   "expected_value_per_customer": 3.0}, cfg.evaluation.thresholds)}
    assert checks["top_decile_lift"].passed and checks["expected_value_per_customer"].passed
    assert not checks["ece"].passed and checks["ece"].detail == "0.0800 > 0.05"  # lower is better


def test_a_higher_auc_with_a_lower_expected_value_is_visible_as_such(telco_scores):
    """The challenger ranks better but its probabilities are three times too low: at the same
    threshold it contacts almost nobody, and the comparison says so beside the AUC verdict."""
    from churnlib.decision.value import row_value
    from churnlib.evaluate.metrics import paired_bootstrap

    p, y = telco_scores
    rng = np.random.default_rng(1)
    baseline = np.clip(p + rng.normal(0, 0.15, len(p)), 0, 1)  # a noisier ranking, same scale
    challenger = p / 3.0  # the better ranking, far too low
    d = D
    worth = row_value(y, d)
    comp = paired_bootstrap(challenger, baseline, y, resamples=300, seed=0,
                            value_rows=(worth * contact(challenger, 0.3, d), worth * contact(baseline, 0.3, d)))
    assert comp.verdict == "better" and comp.value_verdict == "worse"
    assert comp.value_ci[1] < 0 < comp.auc_ci[0]
    assert comp.to_dict()["value_verdict"] == "worse"


@pytest.fixture(scope="module")
def telco_prepared():
    """The Telco table encoded as training encodes it, held in the driver (as small tables are),
    and a real booster fitted on its training rows."""
    import xgboost as xgb

    from churnlib.data.features import FeatureSpec
    from churnlib.data.preparation import Prepared, encode_batch

    cfg = load_config([str(REPO / "configs" / "telco.yaml")], env={})
    spec = FeatureSpec.from_config(cfg.features)
    raw = pd.read_csv(require_shared(TELCO), dtype=str, keep_default_na=False)
    enc = encode_batch(raw, spec, list(raw.columns), cfg.model.validation_split, cfg.model.random_state)
    ok, valid = enc["flags"] == 0, enc["is_valid"].astype(bool)
    train = ok & ~valid
    dtrain = xgb.DMatrix(enc["X"][train], label=enc["y"][train], feature_names=spec.feature_names,
                         feature_types=spec.feature_types, enable_categorical=True)
    booster = xgb.train({**cfg.xgb_params(), "nthread": 1}, dtrain, 60)
    prepared = Prepared(dataset=None, report=None, train_rows=int(train.sum()), valid_rows=int((ok & valid).sum()),
                        local=enc)
    return cfg, prepared, booster


def test_auto_threshold_is_the_best_cut_on_the_validation_rows(telco_prepared):
    from churnlib.model.calibration import Calibrator
    from churnlib.train.decide import decide, validation_scores

    cfg, prepared, booster = telco_prepared
    chosen = decide(cfg, prepared, booster)
    assert chosen["calibration"]["method"] == "platt"  # the default: the cut is on calibrated probabilities
    p, y = validation_scores(prepared, booster, Calibrator.from_dict(chosen["calibration"]))
    assert len(p) == prepared.valid_rows > 1000
    d = Decision(cfg.decision.value_saved, cfg.decision.contact_cost, cfg.decision.save_rate)
    best = max((_brute_value(p, y, t, d)[1], t) for t in set(p.tolist()))
    assert chosen["source"] == "auto" and chosen["threshold"] == pytest.approx(best[1])
    assert chosen["valid_value_total"] == pytest.approx(best[0], abs=1e-6) and best[0] > 0
    # a fixed threshold is kept, and valued on the same rows
    fixed = decide(cfg.model_copy(update={"decision": cfg.decision.model_copy(update={"threshold": 0.5})}),
                             prepared, booster)
    assert fixed["source"] == "fixed" and fixed["threshold"] == 0.5
    assert fixed["valid_value_total"] == pytest.approx(_brute_value(p, y, 0.5, d)[1])
    assert fixed["valid_value_total"] <= chosen["valid_value_total"]
    # contacts that cost more than any save: the model contacts nobody
    dear = cfg.decision.model_copy(update={"contact_cost": 10_000.0})
    nobody = decide(cfg.model_copy(update={"decision": dear}), prepared, booster)
    assert nobody["threshold"] is None and nobody["valid_contacts"] == 0


@pytest.mark.parametrize("value", ["best", 1.5, 0, True])
def test_decision_threshold_is_auto_or_a_probability(value):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"decision.threshold": value}, env={})
    assert str(err.value) == f"config: decision.threshold: must be auto or a probability in (0, 1), got {value!r}"
    assert load_config(overrides={"decision.threshold": 0.3}, env={}).decision.fixed_threshold == 0.3
    assert load_config(env={}).decision.threshold == "auto"
