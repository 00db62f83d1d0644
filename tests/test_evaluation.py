"""`churn evaluate`: metrics against scikit-learn, gates that pass and fail, the baseline
comparison, SHAP additivity, bad input, on real models and a real MLflow store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn import metrics as skm

from churnlib.config import load_config
from churnlib.data.generation import generate, iter_chunks
from churnlib.errors import ConfigError, DataError, ModelNotFoundError
from churnlib.evaluate.command import evaluate
from tests.conftest import (
    KAGGLE_TEST,
    log_local_model,
    make_config,
    no_running_runs,
    require_shared,
    run_cli,
    session_ray_env,
)

QUIET = {"say": lambda m: None}
# Gates this good model clears and the weak one does not.
GATES = {"evaluation.thresholds": {"roc_auc": 0.85, "accuracy": 0.75}}


@pytest.fixture(scope="module")
def store(ray_session, tmp_path_factory):
    """A workspace with a good and a weak model (real logged models) and a multi-file test set."""
    ws = tmp_path_factory.mktemp("evaluate")
    cfg = make_config(ws, **GATES)
    train_path = generate(6000, ws / "train.parquet", seed=3)
    good = log_local_model(cfg, train_path, rounds=60, run_name="good", max_depth=4)
    weak = log_local_model(cfg, train_path, rounds=2, run_name="weak", max_depth=1)
    test_dir = ws / "test"
    test_dir.mkdir()
    for k, chunk in enumerate(iter_chunks(4500, seed=77, chunk_rows=1500)):
        chunk.to_parquet(test_dir / f"part-{k}.parquet", index=False)
    return {"ws": ws, "cfg": cfg, "good": f"runs:/{good}/model", "weak": f"runs:/{weak}/model",
            "good_run": good, "test": test_dir}


def _cfg(store, **overrides):
    values = {**GATES, **overrides}
    return make_config(store["ws"], **values)


@pytest.fixture(scope="module")
def good_eval(store):
    cfg = _cfg(store)
    return evaluate(cfg, store["good"], str(store["test"]), run_name="eval-good", **QUIET)


def test_every_metric_matches_scikit_learn(store, good_eval):
    mlflow.set_tracking_uri(store["cfg"].tracking_uri)
    test = pd.concat([pd.read_parquet(p) for p in sorted(store["test"].glob("*.parquet"))])
    p = mlflow.pyfunc.load_model(store["good"]).predict(test)["churn_probability"].to_numpy()
    y = test["Churn"].to_numpy()
    pred = (p >= 0.5).astype(int)
    m = good_eval.metrics
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-9)
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-9)
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p), rel=1e-6)
    assert m["brier_score"] == pytest.approx(skm.brier_score_loss(y, p), rel=1e-6)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert good_eval.confusion == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert m["churn_rate_actual"] == pytest.approx(y.mean()) and m["churn_rate_predicted"] == pytest.approx(pred.mean())
    assert good_eval.rows["evaluated"] == 4500
    # expected calibration error over the 10 bins of the reliability diagram
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(p[bins == b].sum() - y[bins == b].sum()) for b in range(10)) / len(y)
    assert m["ece"] == pytest.approx(ece, rel=1e-5)


def _assert_gains_and_lift(m: dict, p, y: list[int]) -> list[int]:
    """Gains and lift at 5/10/20 % equal a plain-Python count over the scores sorted (ties in row
    order) -> that order."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    for pct in (5, 10, 20):
        k = -(-pct * len(p) // 100)
        caught = sum(y[i] for i in order[:k])
        assert m[f"gain_at_{pct}pct"] == pytest.approx(caught / sum(y), rel=1e-9)
        assert m[f"lift_at_{pct}pct"] == pytest.approx((caught / k) / (sum(y) / len(y)), rel=1e-9)
    return order


def test_decision_metrics_equal_a_brute_force_on_the_same_scores(store, good_eval):
    """Lift, gains and the value of the cuts from `churn evaluate` are what plain Python finds
    on the pyfunc's scores of the same rows (decision: 500 kept, 25 a contact, 25 % saved)."""
    test = pd.concat([pd.read_parquet(p) for p in sorted(store["test"].glob("*.parquet"))])
    p = mlflow.pyfunc.load_model(store["good"]).predict(test)["churn_probability"].to_numpy().astype(np.float64)
    y = [int(v) for v in test["Churn"]]
    m = good_eval.metrics
    _assert_gains_and_lift(m, p, y)
    worth = [v * 0.25 * 500 - 25 for v in y]

    def value(t):
        return sum(worth[i] for i in range(len(p)) if p[i] >= t)

    # the model carries no chosen cut (logged without validation rows): it contacts from the break-even P
    assert m["expected_value_total"] == pytest.approx(value(0.2), rel=1e-9)
    assert m["value_contacts"] == sum(1 for v in p if v >= 0.2) and m["value_threshold"] == 0.2
    assert m["expected_value_per_customer"] == pytest.approx(value(0.2) / len(p), rel=1e-9)
    assert m["value_at_half_total"] == pytest.approx(value(0.5), rel=1e-9)
    best = max((value(t), t) for t in set(p.tolist()))
    assert m["value_best_total"] == pytest.approx(best[0], rel=1e-9) and best[0] >= m["expected_value_total"]
    assert m["value_best_threshold"] == pytest.approx(best[1], rel=1e-6)
    assert m["value_break_even"] == pytest.approx(0.2)


def test_a_calibrated_model_is_judged_before_and_after_its_calibration(store):
    """A model stopped after 8 rounds (probabilities crowded toward 0.5) with the Platt calibrator
    fitted on its validation rows: `churn evaluate` measures the probabilities it answers (the
    calibrated ones, as the pyfunc gives them) and the booster's own, on 4,500 unseen rows."""
    from churnlib.model.loading import load

    cfg = _cfg(store)
    run_id = log_local_model(cfg, store["ws"] / "train.parquet", rounds=8, run_name="calibrated", calibrate=True,
                             max_depth=4)
    uri = f"runs:/{run_id}/model"
    result = evaluate(cfg, uri, str(store["test"]), run_name="eval-calibrated", **QUIET)
    test = pd.concat([pd.read_parquet(p) for p in sorted(store["test"].glob("*.parquet"))])
    y = test["Churn"].to_numpy()
    predictor = load(uri).predictor
    assert predictor.calibrator is not None and predictor.calibrator.method == "platt"
    from churnlib.data.features import to_matrix

    after = mlflow.pyfunc.load_model(uri).predict(test)["churn_probability"].to_numpy()
    before = predictor.score_uncalibrated(to_matrix(test, predictor.spec)).astype(np.float64)
    m = result.metrics
    assert m["brier_score"] == pytest.approx(skm.brier_score_loss(y, after), rel=1e-6)
    assert m["calibration_brier_before"] == pytest.approx(skm.brier_score_loss(y, before), rel=1e-6)
    assert m["calibration_log_loss_before"] == pytest.approx(skm.log_loss(y, before), rel=1e-6)
    bins = np.minimum((before * 10).astype(int), 9)
    ece_before = sum(abs(before[bins == b].sum() - y[bins == b].sum()) for b in range(10)) / len(y)
    assert m["calibration_ece_before"] == pytest.approx(ece_before, rel=1e-5)
    # held out: the calibration helps where it was not fitted (the ranking is the booster's)
    assert m["ece"] < 0.5 * m["calibration_ece_before"] and m["brier_score"] < m["calibration_brier_before"]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, before), abs=1e-4)
    client = MlflowClient(store["cfg"].tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    assert logged["calibration/ece_before"] == pytest.approx(m["calibration_ece_before"])
    table = json.loads(Path(client.download_artifacts(result.run_id, "calibration.json", str(store["ws"]))).read_text())
    assert len(table["rows"]) == len(table["before_calibration"]) == 10
    assert sum(r["count"] for r in table["before_calibration"]) == 4500


def test_evaluation_run_is_nested_under_training_run_with_artifacts(store, good_eval):
    client = MlflowClient(store["cfg"].tracking_uri)
    run = client.get_run(good_eval.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == store["good_run"] == tags["churn.training_run_id"]
    assert tags["churn.model_uri"] == store["good"]
    assert tags["churn.gate.status"] == "passed"
    assert run.data.metrics["roc_auc"] == pytest.approx(good_eval.metrics["roc_auc"])
    paths = {a.path for d in ("plots", "shap") for a in client.list_artifacts(good_eval.run_id, d)}
    assert {"plots/roc_curve.png", "plots/pr_curve.png", "plots/calibration_curve.png",
            "plots/confusion_matrix.png", "plots/cumulative_gains.png", "plots/lift_curve.png",
            "plots/profit_curve.png", "shap/summary_beeswarm.png", "shap/mean_abs_shap_bar.png",
            "shap/mean_abs_shap.json", "shap/top_customers.json"} <= paths
    assert len([p for p in paths if p.startswith("shap/waterfall_")]) == 5
    mean_abs = json.loads(Path(client.download_artifacts(good_eval.run_id, "shap/mean_abs_shap.json")).read_text())
    assert set(mean_abs) == set(store["cfg"].features.numeric) | set(store["cfg"].features.categorical)
    assert run.data.metrics["shap/mean_abs_Contract_Length"] == pytest.approx(mean_abs["Contract Length"])
    assert run.data.metrics["gate/passed"] == 1.0 and run.data.metrics["rows/evaluated"] == 4500
    # the decision's metrics in their MLflow sections; the gateable ones under their own names
    assert run.data.metrics["top_decile_lift"] == pytest.approx(good_eval.metrics["top_decile_lift"])
    assert run.data.metrics["lift/at_10pct"] == pytest.approx(good_eval.metrics["lift_at_10pct"])
    assert run.data.metrics["value/best_total"] == pytest.approx(good_eval.metrics["value_best_total"])
    assert run.data.params["decision.value_saved"] == "500.0" and run.data.params["decision.capacity"] == "None"
    # the evaluated model shows the evaluation's metrics, measured on the evaluation's dataset
    model_id = MlflowClient(store["cfg"].tracking_uri).get_run(store["good_run"]).outputs.model_outputs[0].model_id
    on_model = [m for m in client.get_logged_model(model_id).metrics or [] if m.key == "roc_auc"]
    assert [m.run_id for m in on_model] == [good_eval.run_id]
    assert on_model[0].value == pytest.approx(good_eval.metrics["roc_auc"]) and on_model[0].dataset_digest
    top = json.loads(Path(client.download_artifacts(good_eval.run_id, "shap/top_customers.json")).read_text())
    probs = [c["probability"] for c in top["customers"]]
    assert probs == sorted(probs, reverse=True) and probs[0] > 0.9
    # contributions are in raw units: a category is its level, not a code
    first = {c["feature"]: c["value"] for c in top["customers"][0]["contributions"]}
    assert first["Contract Length"] in ("Monthly", "Quarterly", "Annual")


def test_shap_sample_is_capped_by_max_samples(store):
    cfg = _cfg(store, evaluation__shap__max_samples=1000, evaluation__shap__top_customers=2)
    res = evaluate(cfg, store["good"], str(store["test"]), **QUIET)
    assert res.shap["rows"] == 1000 and res.shap["top_customers"] == 2


@pytest.mark.parametrize(("challenger", "baseline", "verdict"), [
    ("good", "weak", "better"),
    ("weak", "good", "worse"),
    ("good", "good", "not significantly different"),
])
def test_comparison_with_a_baseline(store, challenger, baseline, verdict):
    cfg = _cfg(store, evaluation__shap__enabled=False, evaluation__bootstrap__resamples=200)
    res = evaluate(cfg, store[challenger], str(store["test"]), baseline_uri=store[baseline], **QUIET)
    comp = res.comparison
    assert comp.verdict == verdict
    assert comp.auc_diff == pytest.approx(res.metrics["roc_auc"] - res.baseline_metrics["roc_auc"])
    lo, hi = comp.auc_ci
    assert lo <= comp.auc_diff <= hi
    if challenger == baseline:
        assert comp.auc_diff == 0 and comp.auc_ci == (0.0, 0.0) and comp.log_loss_diff == 0
        assert comp.value_diff == 0 and comp.value_ci == (0.0, 0.0)
    # the money: the difference in expected value per customer of each model's contacts
    assert comp.value_diff == pytest.approx(
        res.metrics["expected_value_per_customer"] - res.baseline_metrics["expected_value_per_customer"])
    assert comp.value_ci[0] <= comp.value_diff <= comp.value_ci[1]
    assert comp.value_verdict == verdict  # the good model also earns more at the same threshold
    tags = MlflowClient(cfg.tracking_uri).get_run(res.run_id).data.tags
    assert tags["churn.comparison.verdict"] == verdict and tags["churn.baseline_uri"] == store[baseline]


def test_require_improvement_fails_a_model_that_is_not_better(store):
    cfg = _cfg(store, evaluation__require_improvement=True, evaluation__shap__enabled=False,
               evaluation__bootstrap__resamples=200)
    res = evaluate(cfg, store["good"], str(store["test"]), baseline_uri=store["good"], **QUIET)
    assert not res.gate.passed
    assert [c.name for c in res.gate.failures] == ["improvement"]
    better = evaluate(cfg, store["good"], str(store["test"]), baseline_uri=store["weak"], **QUIET)
    assert better.gate.passed


def test_baseline_without_champion_is_a_first_model(store):
    """No champion yet: one line, and the model is judged alone (improvement vacuously met)."""
    cfg = _cfg(store, evaluation__require_improvement=True, evaluation__shap__enabled=False)
    said: list[str] = []
    res = evaluate(cfg, store["good"], str(store["test"]), baseline_uri="models:/nobody_registered_this@champion",
                   say=said.append)
    assert res.comparison is None and res.gate.passed
    assert any(m.startswith("baseline:") and "first model" in m for m in said)
    assert "first model" in res.gate.tags()["churn.gate.improvement"]


def test_baseline_that_is_not_there_fails_the_improvement_gate(store):
    cfg = _cfg(store, evaluation__require_improvement=True, evaluation__shap__enabled=False)
    res = evaluate(cfg, store["good"], str(store["test"]), baseline_uri="runs:/0123456789abcdef0123456789abcdef/model",
                   **QUIET)
    assert not res.gate.passed and res.gate.failures[0].name == "improvement"
    # without the requirement, the same missing baseline only costs the comparison
    cfg = _cfg(store, evaluation__shap__enabled=False)
    res = evaluate(cfg, store["good"], str(store["test"]), baseline_uri="runs:/0123456789abcdef0123456789abcdef/model",
                   **QUIET)
    assert res.gate.passed and res.comparison is None


def test_gate_outcome_is_tagged_on_a_registry_version(store):
    cfg = _cfg(store, evaluation__shap__enabled=False, evaluation__thresholds={"roc_auc": 0.999, "log_loss": 0.9})
    mlflow.set_tracking_uri(cfg.tracking_uri)
    version = mlflow.register_model(store["good"], "eval_gate_model").version
    res = evaluate(cfg, f"models:/eval_gate_model/{version}", str(store["test"]), **QUIET)
    assert not res.gate.passed and res.model_version == str(version)
    vtags = MlflowClient().get_model_version("eval_gate_model", version).tags
    assert vtags["churn.gate.status"] == "failed" and vtags["churn.eval.run_id"] == res.run_id
    assert "roc_auc: failed" in vtags["churn.gate.summary"] and "log_loss: passed" in vtags["churn.gate.summary"]
    # each check's detail is on the evaluation run; the version keeps what a person reads (issue: ~28 tags)
    rtags = MlflowClient(store["cfg"].tracking_uri).get_run(res.run_id).data.tags
    assert rtags["churn.gate.roc_auc"].startswith("failed: ") and "< 0.999" in rtags["churn.gate.roc_auc"]
    assert rtags["churn.gate.log_loss"].startswith("passed: ") and "<= 0.9" in rtags["churn.gate.log_loss"]
    assert "churn.gate.roc_auc" not in vtags and len(vtags) <= 12, sorted(vtags)


def test_ray_job_gate_failure_exits_3_after_logging(store):
    """`python -m ray_jobs.evaluate` (what `ray job submit` runs) takes churn evaluate's arguments."""
    import subprocess
    import sys

    from tests.conftest import REPO

    res = subprocess.run(
        [sys.executable, "-m", "ray_jobs.evaluate", "--model-uri", store["weak"], "--data", str(store["test"]),
         "--gate", "--json", "--set", f"workspace={store['ws'] / '.churn'}", "--set", "evaluation.shap.enabled=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
             **session_ray_env()},
    )
    assert res.returncode == 3, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gate failed: ") and "roc_auc: failed" in last and "Traceback" not in res.stderr
    payload = json.loads(res.stdout)
    assert payload["gate"]["status"] == "failed"
    run = MlflowClient(store["cfg"].tracking_uri).get_run(payload["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["churn.gate.status"] == "failed"
    assert "failed" in run.data.tags["churn.gate.roc_auc"]


def test_cli_gate_pass_exits_0(store):
    res = run_cli(
        "evaluate", "--model-uri", store["good"], "--data", str(store["test"]), "--gate",
        "--set", f"workspace={store['ws'] / '.churn'}", "--set", "evaluation.shap.max_samples=500",
        "--set", "evaluation.thresholds={roc_auc: 0.85}", cwd=store["ws"], attach=True)
    assert res.returncode == 0, res.stderr
    assert "gate: passed" in res.stdout and "roc_auc: 0.9" in res.stdout


def test_gate_on_unknown_metric_is_rejected_when_the_config_loads(store):
    with pytest.raises(ConfigError, match="no metric named 'auc'"):
        load_config(overrides={"evaluation.thresholds": {"auc": 0.8}}, env={})
    res = run_cli("evaluate", "--model-uri", store["good"], "--data", str(store["test"]),
                  "--set", "evaluation.thresholds={roc_auc: 0.8, f2: 0.5}", cwd=store["ws"])
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: config: evaluation.thresholds: no metric named 'f2' is computed "
        "(known: roc_auc, pr_auc, accuracy, precision, recall, f1, top_decile_lift, lift_at_5pct, lift_at_10pct, "
        "lift_at_20pct, gain_at_5pct, gain_at_10pct, gain_at_20pct, expected_value_per_customer, "
        "expected_value_total, precision_at_capacity, recall_at_capacity, log_loss, brier_score, ece)"
    )


# Bad input: one line, non-zero exit, no RUNNING run -----------------------------------------


def _bad_data(store, name: str, frame: pd.DataFrame) -> Path:
    path = store["ws"] / name
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case", ["missing_column", "one_class", "unknown_category", "non_numeric", "empty_file",
                                  "no_model"])
def test_bad_input_is_one_line_and_leaves_no_running_run(store, case):
    cfg = _cfg(store)
    raw = next(iter_chunks(400, seed=5, chunk_rows=400))
    uri = store["good"]
    if case == "missing_column":
        path, match, err = _bad_data(store, "nocol.csv", raw.drop(columns=["Tenure"])), "missing column", DataError
    elif case == "one_class":
        raw["Churn"] = 0
        path, match, err = _bad_data(store, "oneclass.csv", raw), "one class", DataError
    elif case == "unknown_category":
        raw = raw.astype({"Gender": object})
        raw.loc[7, "Gender"] = "Robot"
        path, match, err = _bad_data(store, "unknown.csv", raw), "unknown category", DataError
    elif case == "non_numeric":
        # issue: Ray's task name with ANSI codes instead of the column and the value
        raw = raw.astype({"Age": object})
        raw.loc[9, "Age"] = "forty"
        path, match, err = (_bad_data(store, "nonnum.csv", raw),
                            r"column 'Age': 1 row\(s\) with a non-numeric value \(first: 'forty'\)$", DataError)
    elif case == "empty_file":
        path = store["ws"] / "empty.csv"
        path.write_text("")
        match, err = "empty", DataError
    else:
        path, match, err = _bad_data(store, "fine.csv", raw), "does not resolve", ModelNotFoundError
        uri = "runs:/ffffffffffffffffffffffffffffffff/model"
    with pytest.raises(err, match=match) as info:
        evaluate(cfg, uri, str(path), **QUIET)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert no_running_runs(cfg)


@pytest.mark.parametrize("case", ["non_numeric", "unknown_category"])
def test_cli_bad_values_in_a_small_table_are_named_without_ray(store, case):
    """A small table is scored in the command's own process; when a value is bad, finding and naming
    it stays there too. Ray's auto-connect is off in this command: had the check gone to Ray Data
    (CI: Ray Data's own plain ray.init() attached to a dead recorded cluster and hung for 900 s),
    the command would fail for that, not name the value."""
    raw = next(iter_chunks(400, seed=5, chunk_rows=400))
    if case == "non_numeric":
        raw = raw.astype({"Age": object})
        raw.loc[9, "Age"] = "forty"
        raw.loc[31, "Age"] = "fifty"
        want = "column 'Age': 2 row(s) with a non-numeric value (first: 'forty')"
    else:
        raw = raw.astype({"Gender": object})
        raw.loc[7, "Gender"] = "Robot"
        want = "column 'Gender': 1 row(s) with an unknown category (first: 'Robot'; allowed: "
    path = _bad_data(store, f"cli-{case}.csv", raw)
    res = run_cli("evaluate", "--model-uri", store["good"], "--data", str(path),
                  "--set", f"workspace={store['ws'] / '.churn'}", cwd=store["ws"],
                  env={"RAY_ENABLE_AUTO_CONNECT": "0", "RAY_ADDRESS": ""})
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: {want}") and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert no_running_runs(store["cfg"])


def test_cli_missing_model_exits_2_before_anything_starts(store):
    res = run_cli("evaluate", "--model-uri", "models:/no_such_model/3", "--data", str(store["test"]),
                  "--set", f"workspace={store['ws'] / '.churn'}", cwd=store["ws"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: model models:/no_such_model/3 does not resolve")
    assert no_running_runs(store["cfg"])


def test_evaluate_on_the_real_kaggle_test_file(store):
    path = require_shared(KAGGLE_TEST)
    cfg = _cfg(store, evaluation__shap__max_samples=2000)
    res = evaluate(cfg, store["good"], str(path), **QUIET)
    # 64,374 real rows; the file's distribution differs from the generator's, so only sanity here
    assert res.rows["evaluated"] == 64374 and res.rows["positives"] == 30493
    assert 0.5 < res.metrics["roc_auc"] <= 1.0 and res.shap["rows"] == 2000
    assert MlflowClient(cfg.tracking_uri).get_run(res.run_id).data.tags["data.source"] == str(path)
    # the decision's arithmetic on the real rows: gains and lift over the pyfunc's scores sorted in
    # plain Python, and the best cut by walking them from the top (every distinct score a cut)
    test = pd.read_csv(path).dropna(how="all")
    p = mlflow.pyfunc.load_model(store["good"]).predict(test)["churn_probability"].astype(float).tolist()
    y = [int(v) for v in test["Churn"]]
    m = res.metrics
    order = _assert_gains_and_lift(m, p, y)
    best, total = (0.0, None), 0.0
    for rank, i in enumerate(order):
        total += y[i] * 0.25 * 500 - 25
        if rank + 1 == len(order) or p[order[rank + 1]] < p[i]:  # the last row of a distinct score
            best = max(best, (total, p[i]), key=lambda t: t[0])
    assert m["value_best_total"] == pytest.approx(best[0], rel=1e-9)
    assert m["value_best_threshold"] == pytest.approx(best[1], rel=1e-6)


def test_metrics_need_no_raw_table_on_the_driver(store):
    """The sums from many blocks equal the sums of the whole: streaming is exact."""
    from churnlib.evaluate.metrics import batch_sums, merge_sums, threshold_metrics

    rng = np.random.default_rng(0)
    p, y = rng.random(10_000), (rng.random(10_000) < 0.4).astype(float)
    whole = threshold_metrics(merge_sums([batch_sums(p, y, 0.5, 10)], 10))
    parts = threshold_metrics(merge_sums([batch_sums(p[i:i + 997], y[i:i + 997], 0.5, 10) for i in range(0, 10_000, 997)], 10))
    assert parts == pytest.approx(whole)
    assert whole["log_loss"] == pytest.approx(skm.log_loss(y, p))


# Last in the file: it adds two evaluations of the good model (the tests above count them).
def test_a_small_table_is_scored_in_this_process_as_on_ray_data(store, good_eval):
    """The 4,500-row test set is scored in the driver (no Ray Data pool, no actor's constructor
    in the object store: Ray's E line gone); forced onto Ray Data it gives the same numbers."""
    said: list[str] = []
    here = evaluate(_cfg(store), store["good"], str(store["test"]), say=said.append)
    assert any(m.startswith("data: scoring") and "in this process" in m for m in said), said
    said.clear()
    ray_data = evaluate(_cfg(store, scoring__engine="ray_data"), store["good"], str(store["test"]), say=said.append)
    assert any(m.startswith("data: scoring") and "on Ray Data" in m for m in said), said
    for res in (here, good_eval):
        assert res.rows == ray_data.rows and res.confusion == ray_data.confusion
        assert res.metrics == pytest.approx(ray_data.metrics, rel=1e-9, abs=1e-12)
        assert res.shap["rows"] == ray_data.shap["rows"] and res.shap["top_customers"] == ray_data.shap["top_customers"]
        assert res.shap["mean_abs"] == pytest.approx(ray_data.shap["mean_abs"], rel=1e-6)
