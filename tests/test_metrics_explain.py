"""Pure parts of evaluation: weighted AUC and the paired bootstrap, gates, SHAP explainers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from churnlib.data.features import FeatureSpec
from churnlib.data.generation import iter_chunks
from churnlib.data.preparation import encode_batch
from churnlib.evaluate.gates import evaluate_gates
from churnlib.evaluate.metrics import _WeightedAUC, paired_bootstrap, verdict_from_ci
from churnlib.model.explain import explain, raw_values, top_reasons
from tests.conftest import make_config

pytestmark = pytest.mark.unit  # no Ray, no server, no database


def test_weighted_auc_with_unit_weights_is_roc_auc_including_ties():
    rng = np.random.default_rng(1)
    p = np.round(rng.random(5000), 2)  # many ties
    y = (rng.random(5000) < p).astype(float)
    assert _WeightedAUC(p, y)(np.ones(5000)) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # integer weights are the same as repeating rows
    w = rng.integers(0, 3, 5000)
    rep = np.repeat(np.arange(5000), w)
    assert _WeightedAUC(p, y)(w.astype(float)) == pytest.approx(roc_auc_score(y[rep], p[rep]), abs=1e-12)


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(2)
    y = (rng.random(4000) < 0.4).astype(float)
    signal = y + rng.normal(0, 1.0, 4000)
    strong = 1 / (1 + np.exp(-2 * signal))
    weak = 1 / (1 + np.exp(-(y * 0.3 + rng.normal(0, 1.0, 4000))))
    assert paired_bootstrap(strong, weak, y, 300, seed=1).verdict == "better"
    assert paired_bootstrap(weak, strong, y, 300, seed=1).verdict == "worse"
    same = paired_bootstrap(strong, strong.copy(), y, 300, seed=1)
    assert same.verdict == "not significantly different" and same.auc_ci == (0.0, 0.0)
    # a tiny real difference on few rows is not significant
    noisy = np.clip(strong + rng.normal(0, 0.01, 4000), 0, 1)
    assert paired_bootstrap(noisy[:300], strong[:300], y[:300], 300, seed=1).verdict == "not significantly different"
    # a subsample above max_rows, same verdict
    capped = paired_bootstrap(strong, weak, y, 200, seed=1, max_rows=1000)
    assert capped.rows == 1000 and capped.verdict == "better"
    assert verdict_from_ci(-0.01, 0.02) == "not significantly different"


def test_gates_minimums_maximums_and_missing_metrics():
    metrics = {"accuracy": 0.9, "roc_auc": 0.79, "log_loss": 0.31, "brier_score": 0.1}
    res = evaluate_gates(metrics, {"accuracy": 0.85, "roc_auc": 0.8, "log_loss": 0.3, "brier_score": 0.2}, False)
    by = {c.name: c for c in res.checks}
    assert by["accuracy"].passed and not by["roc_auc"].passed
    assert not by["log_loss"].passed and by["log_loss"].detail == "0.3100 > 0.3"  # a loss is a maximum
    assert by["brier_score"].passed and by["brier_score"].detail == "0.1000 <= 0.2"
    assert res.status == "failed" and res.tags()["churn.gate.status"] == "failed"
    # a configured gate whose metric is missing (or NaN) fails; it is never skipped
    res = evaluate_gates({"accuracy": float("nan")}, {"accuracy": 0.5, "f1": 0.5}, False)
    assert [c.passed for c in res.checks] == [False, False]
    assert evaluate_gates({"accuracy": 0.9}, {"accuracy": 0.5}, False).passed


@pytest.fixture(scope="module")
def small_model():
    cfg = make_config(Path("."))
    spec = FeatureSpec.from_config(cfg.features)
    raw = next(iter_chunks(3000, seed=8, chunk_rows=3000))
    enc = encode_batch(raw, spec, spec.feature_names + ["Churn"], 0.2, 1)
    X = enc["X"].copy()
    X[::17, 0] = np.nan  # missing values take the default branch; still additive
    d = xgb.DMatrix(X, label=enc["y"], feature_names=spec.feature_names, feature_types=spec.feature_types,
                    enable_categorical=True)
    booster = xgb.train({"max_depth": 5, "eta": 0.2, "objective": "binary:logistic", "nthread": 1}, d, 30)
    return booster, spec, X


@pytest.mark.parametrize("kind", ["tree", "tree_explainer", "exact"])
def test_shap_is_additive_for_every_explained_row(small_model, kind):
    booster, spec, X = small_model
    rows = X[:40] if kind == "exact" else X[:1000]
    expl = explain(booster, rows, spec, kind, background=X[1000:1050])
    margin = booster.inplace_predict(rows, predict_type="margin")
    assert expl.values.shape == (len(rows), len(spec.feature_names))
    np.testing.assert_allclose(expl.base_values + expl.values.sum(axis=1), margin, rtol=1e-4, atol=1e-4)


def test_tree_and_tree_explainer_agree_exactly(small_model):
    booster, spec, X = small_model
    a = explain(booster, X[:500], spec, "tree")
    b = explain(booster, X[:500], spec, "tree_explainer")
    np.testing.assert_array_equal(a.values, b.values)


def test_explanations_are_in_raw_units(small_model):
    booster, spec, X = small_model
    expl = explain(booster, X[:5], spec, "tree")
    raw = raw_values(expl.X, spec)
    j = spec.feature_names.index("Contract Length")
    assert set(raw[:, j]) <= {"Monthly", "Quarterly", "Annual"}
    assert raw[0, 0] is None  # the NaN put in Age above
    reasons = top_reasons(expl, spec, k=3)
    sizes = [abs(r["contribution"]) for r in reasons[1]]
    assert len(reasons[1]) == 3 and sizes == sorted(sizes, reverse=True)
