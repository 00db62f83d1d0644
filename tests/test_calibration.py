"""Calibrated probabilities (churnlib.model.calibration): fitted at training, applied in one place.

A booster trained as `churn train` trains it (early stopping on the validation AUC)
on a small generated table stops after a few rounds, its probabilities crowded
toward 0.5: the calibrator fitted on its validation rows must bring the expected
calibration error down on rows it never saw. Platt's fit is checked against
scikit-learn's logistic regression, isotonic's against scikit-learn's isotonic
regression, and SHAP values must still add up to the probability answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from churnlib.config import load_config
from churnlib.data.features import FeatureSpec
from churnlib.data.generation import iter_chunks
from churnlib.data.preparation import Prepared, encode_batch
from churnlib.errors import ConfigError
from churnlib.model.calibration import (
    MIN_ROWS,
    Calibrator,
    fit,
    reliability,
    scores,
    sigmoid,
)
from churnlib.model.predictor import ChurnPredictor, save_model_dir
from churnlib.train.decide import decide
from tests.conftest import make_config

pytestmark = pytest.mark.unit


def test_platt_is_the_maximum_likelihood_logistic_map_of_the_margin():
    rng = np.random.default_rng(3)
    m = rng.normal(0.0, 2.0, 40_000)
    y = (rng.random(len(m)) < sigmoid(0.6 * m - 0.4)).astype(np.int8)
    cal, note = fit("platt", m, y)
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(m[:, None], y)
    # Platt's smoothed targets move the fit by O(1/n) only
    assert cal.a == pytest.approx(lr.coef_[0, 0], abs=2e-3) and cal.b == pytest.approx(lr.intercept_[0], abs=2e-3)
    assert cal.a == pytest.approx(0.6, abs=0.03) and cal.b == pytest.approx(-0.4, abs=0.05)
    assert note.startswith("platt (P = sigmoid(") and cal.rows == 40_000
    # monotone: the ranking (and so the AUC) is the booster's, up to float32 ties
    p = cal.apply(m)
    assert p.dtype == np.float32 and roc_auc_score(y, p) == pytest.approx(roc_auc_score(y, m), abs=1e-6)


def test_isotonic_applies_as_scikit_learn_predicts():
    rng = np.random.default_rng(4)
    m = rng.normal(0.0, 1.5, 5000)
    y = (rng.random(len(m)) < sigmoid(2.0 * m)).astype(np.int8)
    cal, _ = fit("isotonic", m, y)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(sigmoid(m), y)
    new = rng.normal(0.0, 3.0, 2000)  # beyond the fitted range too (clipped at the ends)
    expected = np.clip(iso.predict(sigmoid(new)), 0.5 / 5000, 1 - 0.5 / 5000)
    np.testing.assert_allclose(cal.apply(new), expected, atol=1e-6)
    assert 0 < cal.apply(np.array([-50.0]))[0] and cal.apply(np.array([50.0]))[0] < 1  # log loss stays finite
    # through the model's metadata and back: the same map
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(again.apply(new), cal.apply(new))


def test_too_few_rows_one_class_or_none_leave_the_model_uncalibrated():
    rng = np.random.default_rng(5)
    m = rng.normal(size=MIN_ROWS - 1)
    cal, note = fit("platt", m, (m > 0).astype(np.int8))
    assert cal is None and note.startswith(f"skipped: {MIN_ROWS - 1} validation row(s)")
    cal, note = fit("isotonic", rng.normal(size=500), np.zeros(500, dtype=np.int8))
    assert cal is None and "0 churner(s)" in note
    assert fit("none", m, (m > 0).astype(np.int8)) == (None, "none (model.calibration)")
    assert Calibrator.from_dict({"method": "none"}) is None and Calibrator.from_dict(None) is None
    with pytest.raises(ValueError, match="unknown calibration 'beta'"):
        fit("beta", m, (m > 0).astype(np.int8))


def test_calibration_is_a_model_setting_checked_at_load():
    assert load_config(env={}).model.calibration == "platt"
    assert load_config(overrides={"model.calibration": "isotonic"}, env={}).model.calibration == "isotonic"
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"model.calibration": "beta"}, env={})
    assert str(err.value).startswith("config: model.calibration: ") and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def generated():
    """A small generated table encoded as training encodes it, a booster trained as `churn train`
    trains it (early stopping on the validation AUC, trees kept up to the best round), and a
    held-out table from another seed."""
    cfg = make_config(Path("."))
    spec = FeatureSpec.from_config(cfg.features)
    columns = spec.feature_names + [spec.target]
    enc = encode_batch(next(iter_chunks(2000, seed=7, chunk_rows=2000)), spec, columns,
                       cfg.model.validation_split, cfg.model.random_state)
    ok, valid = enc["flags"] == 0, enc["is_valid"].astype(bool)

    def dmatrix(rows):
        return xgb.DMatrix(enc["X"][rows], label=enc["y"][rows], feature_names=spec.feature_names,
                           feature_types=spec.feature_types, enable_categorical=True)

    params = {**cfg.xgb_params(), "nthread": 1}
    booster = xgb.train(params, dmatrix(ok & ~valid), cfg.xgboost.num_boost_round,
                        evals=[(dmatrix(ok & valid), "valid")], verbose_eval=False,
                        early_stopping_rounds=cfg.xgboost.early_stopping_rounds, custom_metric=None)
    booster = booster[: booster.best_iteration + 1]
    prepared = Prepared(dataset=None, report=None, train_rows=int((ok & ~valid).sum()),
                        valid_rows=int((ok & valid).sum()), local=enc)
    test = encode_batch(next(iter_chunks(20_000, seed=9, chunk_rows=20_000)), spec, columns, 0.2, 1)
    keep = test["flags"] == 0
    return cfg, spec, prepared, booster, test["X"][keep], test["y"][keep]


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_lowers_the_ece_on_held_out_rows_of_the_generated_table(generated, method):
    cfg, spec, prepared, booster, X_test, y_test = generated
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"calibration": method})})
    chosen = decide(cfg, prepared, booster)
    calibrator = Calibrator.from_dict(chosen["calibration"])
    assert calibrator is not None and calibrator.method == method and calibrator.rows == prepared.valid_rows
    m = chosen["calibration_metrics"]
    assert m["calibration_valid_ece_after"] < m["calibration_valid_ece_before"]
    bins = cfg.evaluation.calibration_bins
    before = reliability(scores(booster, X_test, None), y_test, bins)
    after = reliability(scores(booster, X_test, calibrator), y_test, bins)
    # measured here (35 rounds, 401 validation rows): ECE 0.065 before; platt 0.020, isotonic 0.036
    # after, on 20,000 unseen rows; Brier 0.1000 -> 0.0957 and 0.0988
    assert after["ece"] < 0.75 * before["ece"] and after["brier"] < before["brier"]
    # the contact threshold is chosen on the calibrated probabilities: contacting from it pays
    assert chosen["source"] == "auto" and 0 < chosen["threshold"] < 1 and chosen["valid_value_total"] > 0


def test_the_predictor_answers_calibrated_probabilities_and_additive_explanations(generated, tmp_path):
    cfg, spec, prepared, booster, X_test, y_test = generated
    chosen = decide(cfg, prepared, booster)
    meta = {"decision_threshold": 0.5, "calibration": chosen["calibration"],
            "decision": {"value_saved": 780.0, "contact_cost": 50.0, "save_rate": 0.3,
                         "threshold": chosen["threshold"], "threshold_source": "auto"}}
    predictor = ChurnPredictor.from_dir(save_model_dir(tmp_path / "m", booster, spec, meta))
    cal = predictor.calibrator
    assert cal is not None and cal.method == "platt" and cal.a > 1  # early stopping left P crowded toward 0.5
    p = predictor.score(X_test[:500])
    np.testing.assert_allclose(p, sigmoid(cal.a * booster.inplace_predict(X_test[:500], predict_type="margin") + cal.b),
                               rtol=1e-6)
    assert not np.allclose(p, predictor.score_uncalibrated(X_test[:500]), atol=1e-3)
    # SHAP values of the calibrated log-odds add up to the probability answered
    expl = predictor.explain(X_test[:200])
    np.testing.assert_allclose(sigmoid(expl.margin), p[:200], rtol=1e-4, atol=1e-5)
    # a payload (how scoring actors get the model) carries the calibrator too
    again = ChurnPredictor.from_payload(predictor.to_payload())
    np.testing.assert_array_equal(again.score(X_test[:500]), p)


def test_a_model_without_calibration_answers_the_boosters_own_probability(generated, tmp_path):
    """Models logged before calibration existed (no "calibration" in their metadata)."""
    _, spec, _, booster, X_test, _ = generated
    predictor = ChurnPredictor.from_dir(save_model_dir(tmp_path / "old", booster, spec, {"decision_threshold": 0.5}))
    assert predictor.calibrator is None
    np.testing.assert_array_equal(predictor.score(X_test[:300]), booster.inplace_predict(X_test[:300]))
