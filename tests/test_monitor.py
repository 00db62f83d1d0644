"""`churn monitor` on a real prediction log (SQLite), a real registered model and real outcomes:
realized metrics equal scikit-learn's on the same joined rows, the estimate from the calibrated
probabilities lands near them, drifted traffic is flagged, an alert exits 4."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from churnlib.data.features import to_matrix
from churnlib.data.generation import generate, iter_chunks
from churnlib.monitor.estimate import expected_accuracy, expected_roc_auc
from churnlib.predlog.schema import encode_features
from churnlib.predlog.store import LogStore
from tests.conftest import log_local_model, make_config, run_cli

D0 = dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc)


@pytest.mark.unit
def test_the_expected_auc_and_accuracy_are_the_mean_over_labels_drawn_from_the_probabilities():
    rng = np.random.default_rng(5)
    p = 1 / (1 + np.exp(-rng.normal(-0.5, 1.6, 2000)))
    draws = [(rng.random(len(p)) < p).astype(int) for _ in range(300)]
    auc = np.mean([roc_auc_score(y, p) for y in draws])
    acc = np.mean([((p >= 0.5) == y).mean() for y in draws])
    assert expected_roc_auc(p) == pytest.approx(auc, abs=0.003)
    assert expected_accuracy(p, 0.5) == pytest.approx(acc, abs=0.002)
    assert np.isnan(expected_roc_auc(np.array([0.3])))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A calibrated champion; three days of traffic in the log (day 3 with Age shifted by 25 years),
    a batch run's scores on day 2; outcomes for days 1 and 2 observed 5 days later."""
    from churnlib.registry.registry import Registry

    ws = tmp_path_factory.mktemp("monitor")
    cfg = make_config(ws)
    train = generate(5000, ws / "train.parquet", seed=31)
    run = log_local_model(cfg, train, rounds=40, run_name="champion", calibrate=True, max_depth=4)
    reg = Registry(cfg, say=lambda m: None)
    version, _ = reg.register(run)
    reg.set_alias(version.version, "champion")
    from churnlib.model.loading import load

    predictor = load(f"models:/{cfg.model.registered_name}/{version.version}").predictor
    spec = predictor.spec
    traffic = next(iter_chunks(3000, seed=77, chunk_rows=3000)).reset_index(drop=True)
    traffic.loc[2000:, "Age"] = traffic.loc[2000:, "Age"] + 25  # day 3: older customers than in training
    traffic["CustomerID"] = np.arange(100_000, 103_000)
    p = predictor.predict(traffic)
    day = np.repeat([0, 1, 2], 1000)
    ts = [D0 + dt.timedelta(days=int(d), seconds=int(30 * (i % 1000))) for i, d in enumerate(day)]
    X = to_matrix(traffic, spec)  # what Serve records: the model-matrix row of each record
    rows = [{"prediction_id": str(uuid.uuid4()), "ts": ts[i], "request_id": f"r{i}", "customer_id": str(cid),
             "model_name": cfg.model.registered_name, "model_version": version.version, "route": "champion",
             "endpoint": "predict", "probability": float(p["churn_probability"][i]), "label": int(p["churn_label"][i]),
             "contact": bool(p["contact"][i]), "expected_value": float(p["expected_value"][i]),
             "features": encode_features(X[i])}
            for i, cid in enumerate(traffic["CustomerID"])]
    store = LogStore(cfg.log_uri)
    store.migrate()
    store.insert_predictions(rows)
    # a churn predict run on day 2, its scores in Parquet as predict writes them
    batch = next(iter_chunks(500, seed=78, chunk_rows=500)).reset_index(drop=True)
    batch["CustomerID"] = np.arange(200_000, 200_500)
    bp = predictor.predict(batch)
    out = ws / "scores"
    out.mkdir()
    pd.DataFrame({"customer_id": batch["CustomerID"], "churn_probability": bp["churn_probability"],
                  "churn_label": bp["churn_label"].astype(np.int8), "expected_value": bp["expected_value"],
                  "contact": bp["contact"], "model_name": cfg.model.registered_name,
                  "model_version": version.version}).to_parquet(out / "part-0.parquet", index=False)
    finished = D0 + dt.timedelta(days=1, hours=12)
    store.record_run({"run_id": "batch-run-1", "started": finished - dt.timedelta(minutes=5), "finished": finished,
                      "model_name": cfg.model.registered_name, "model_version": version.version,
                      "input_uri": "customers.csv", "output_uri": str(out), "rows_scored": 500,
                      "contacts": int(bp["contact"].sum()), "contacts_only": False})
    store.close()
    outcome_rows = [(cid, int(y), (ts[i] + dt.timedelta(days=5)).isoformat())
                    for i, (cid, y) in enumerate(zip(traffic["CustomerID"], traffic["Churn"])) if day[i] < 2]
    outcome_rows += [(cid, int(y), (finished + dt.timedelta(days=5)).isoformat())
                     for cid, y in zip(batch["CustomerID"], batch["Churn"])]
    pd.DataFrame(outcome_rows, columns=["CustomerID", "Churn", "observed_at"]).to_csv(ws / "outcomes.csv", index=False)
    res = run_cli("outcomes", "load", "--data", str(ws / "outcomes.csv"), "--set", f"workspace={ws / '.churn'}",
                  cwd=ws)
    assert res.returncode == 0, res.stderr
    return {"ws": ws, "cfg": cfg, "version": version.version, "p": p["churn_probability"].to_numpy(),
            "y": traffic["Churn"].to_numpy(), "bp": bp["churn_probability"].to_numpy(), "by": batch["Churn"].to_numpy()}


def _monitor(live, *args: str):
    return run_cli("monitor", "--window", "1d", "--json", "--set", f"workspace={live['ws'] / '.churn'}", *args,
                   cwd=live["ws"])


def test_realized_metrics_equal_scikit_learn_and_the_estimate_is_close(live):
    res = _monitor(live, "--since", "2026-11-02", "--until", "2026-11-04")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    windows = report["windows"]
    assert [(w["model_version"], w["start"][:10]) for w in windows] == [(live["version"], "2026-11-02"),
                                                                       (live["version"], "2026-11-03")]
    day1, day2 = (w["metrics"] for w in windows)
    assert (day1["volume"], day1["served"], day1["batch"]) == (1000, 1000, 0)
    assert (day2["volume"], day2["served"], day2["batch"]) == (1500, 1000, 500)
    # realized: every row's outcome is in; the same numbers as scikit-learn on the same rows
    p, y = live["p"], live["y"]
    assert day1["pending"] == 0 and day1["realized_rows"] == 1000
    assert day1["realized_roc_auc"] == pytest.approx(roc_auc_score(y[:1000], p[:1000]), abs=1e-9)
    p2, y2 = np.concatenate([p[1000:2000], live["bp"]]), np.concatenate([y[1000:2000], live["by"]])
    assert day2["realized_roc_auc"] == pytest.approx(roc_auc_score(y2, p2), abs=1e-9)
    # estimated from the calibrated probabilities alone: within 0.02 of what the outcomes said
    for m in (day1, day2):
        assert abs(m["estimated_roc_auc"] - m["realized_roc_auc"]) < 0.02, m
        assert abs(m["estimated_accuracy"] - m["realized_accuracy"]) < 0.03, m
    # live drift against the training profile: the same generator, nothing major
    assert windows[0]["drift"] and all(d["psi"] < 0.25 for d in windows[0]["drift"])
    assert report["alerts"] == []
    # the MLflow monitoring run: each metric per version, the window as the step
    history = MlflowClient(live["cfg"].tracking_uri).get_metric_history(report["run_id"],
                                                                         f"v{live['version']}/realized_roc_auc")
    assert [(h.step, round(h.value, 9)) for h in history] == [(0, round(day1["realized_roc_auc"], 9)),
                                                               (1, round(day2["realized_roc_auc"], 9))]
    artifacts = {a.path for a in MlflowClient(live["cfg"].tracking_uri).list_artifacts(report["run_id"], "monitor")}
    assert artifacts == {"monitor/report.json", f"monitor/xgboost_churn_model_v{live['version']}.png"}


def test_drifted_traffic_is_an_alert_and_exits_4(live):
    res = _monitor(live, "--since", "2026-11-02", "--until", "2026-11-05", "--no-record")
    assert res.returncode == 4
    report = json.loads(res.stdout)
    day3 = report["windows"][2]
    assert day3["metrics"]["pending"] == 1000 and "realized_roc_auc" not in day3["metrics"]
    assert day3["metrics"]["estimated_roc_auc"] > 0.7  # no outcomes yet: the estimate stands in
    age = next(d for d in day3["drift"] if d["feature"] == "Age")
    assert age["psi"] > 0.25 and any(a.startswith("drift: Age PSI") for a in day3["alerts"])
    assert report["windows"][0]["alerts"] == [] and report["windows"][1]["alerts"] == []
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 alert(s); first: ") and "drift: Age PSI" in last


def test_monitor_bad_input_is_one_line(live):
    res = _monitor(live, "--since", "last week")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: not a date, time or span: 'last week' (2026-11-01, 2026-11-01T12:00, 7d, 12h)"
    res = _monitor(live, "--since", "2026-11-05", "--until", "2026-11-02")
    assert res.returncode == 2 and "is not before --until" in res.stderr


def test_the_real_kaggle_test_file_drifts_live_as_it_does_in_batch(ray_session, tmp_path):
    """A model trained on the real Kaggle training slice; the Kaggle test file's first 20,000
    customers as live traffic in the log (their model-matrix rows, as Serve records them):
    `churn monitor` finds each feature's PSI and verdict exactly as `churn drift` finds them on the
    same rows read as a file."""
    from churnlib.batch.drift import drift_report
    from churnlib.model.loading import load
    from churnlib.registry.registry import Registry
    from tests.conftest import KAGGLE_TEST, KAGGLE_TRAIN_PARTIAL, require_shared

    cfg = make_config(tmp_path)
    run = log_local_model(cfg, require_shared(KAGGLE_TRAIN_PARTIAL), rounds=30, run_name="kaggle", calibrate=True,
                          max_depth=4)
    version, _ = Registry(cfg, say=lambda m: None).register(run)
    predictor = load(f"models:/{cfg.model.registered_name}/{version.version}").predictor
    test = pd.read_csv(require_shared(KAGGLE_TEST), nrows=20_000)
    test.to_csv(tmp_path / "traffic.csv", index=False)
    batch = {d.feature: d for d in drift_report(cfg, f"models:/{cfg.model.registered_name}/{version.version}",
                                                str(tmp_path / "traffic.csv"), say=lambda m: None)}
    X = to_matrix(test, predictor.spec)
    p = predictor.predict(test)["churn_probability"].to_numpy()
    store = LogStore(cfg.log_uri)
    store.migrate()
    store.insert_predictions([
        {"prediction_id": str(uuid.uuid4()), "ts": D0 + dt.timedelta(seconds=i), "request_id": "kaggle",
         "customer_id": str(cid), "model_name": cfg.model.registered_name, "model_version": version.version,
         "route": "champion", "endpoint": "predict", "probability": float(p[i]), "label": int(p[i] >= 0.5),
         "contact": None, "expected_value": None, "features": encode_features(X[i])}
        for i, cid in enumerate(test["CustomerID"])])
    store.close()
    res = run_cli("monitor", "--since", "2026-11-02", "--until", "2026-11-03", "--window", "1d", "--json",
                  "--no-record", "--set", f"workspace={tmp_path / '.churn'}", cwd=tmp_path)
    report = json.loads(res.stdout)
    live = {d["feature"]: d for d in report["windows"][0]["drift"]}
    assert set(live) == set(batch) == set(predictor.spec.feature_names)
    for name, d in batch.items():
        assert live[name]["psi"] == pytest.approx(d.psi, abs=1e-9) and live[name]["verdict"] == d.verdict, name
    flagged = sorted(n for n, d in batch.items() if d.verdict != "stable")
    assert flagged, "the Kaggle test file differs from the training slice"
    assert (res.returncode == 4) == any(live[n]["psi"] > 0.25 for n in live)
