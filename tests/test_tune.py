"""`churn tune`: a real small sweep on the session's Ray instance; parent and child runs in MLflow,
ASHA stopping trials, --register-best, a bad search space refused up front, resume after an interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from churnlib.generate import iter_chunks
from churnlib.registry import Registry
from churnlib.tuning import tune
from tests.conftest import REPO, make_config, run_cli

SWEEP = {
    "tune.num_samples": 4,
    "tune.max_concurrent": 1,  # one after another: ASHA's decisions do not depend on timing
    "tune.search": "random",
    "tune.seed": 3,
    "tune.grace_period": 5,
    "tune.reduction_factor": 2,
    "tune.report_every": 5,
    "tune.search_space": {
        "eta": {"distribution": "loguniform", "low": 0.005, "high": 0.4},
        "max_depth": {"distribution": "randint", "low": 1, "high": 6},
        "subsample": {"distribution": "uniform", "low": 0.6, "high": 1.0},
    },
    "xgboost.num_boost_round": 30,
    "data.generate_rows": 3000,
}


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    ws = tmp_path_factory.mktemp("tune")
    cfg = make_config(ws, **SWEEP)
    said: list[str] = []
    result = tune(cfg, register_best=True, say=said.append)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    return cfg, result, said


def _children(cfg, parent_id: str):
    client = MlflowClient(cfg.tracking_uri)
    return client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
    )


def test_parent_run_records_the_sweep(sweep):
    cfg, result, _ = sweep
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["tune.search"] == "random" and params["tune.scheduler"] == "asha"
    assert json.loads(params["tune.search_space"])["eta"] == {"distribution": "loguniform", "low": 0.005, "high": 0.4}
    assert parent.data.metrics["trials"] == 4
    assert parent.data.metrics["best_valid_auc"] == pytest.approx(result.best["score"])
    assert parent.data.tags["churn.best_trial_run_id"] == result.best["run_id"]
    assert {f"best.{k}" for k in ("eta", "max_depth", "subsample")} <= set(params)
    arts = {a.path for a in client.list_artifacts(result.parent_run_id, "tune")}
    assert {"tune/trials.json", "tune/metric_vs_params.png", "tune/trial_progress.png"} <= arts
    scores = [t["score"] for t in result.trials if t["score"] is not None]
    assert result.best["score"] == max(scores)


def test_one_child_run_per_trial_with_params_metrics_and_status(sweep):
    cfg, result, _ = sweep
    children = _children(cfg, result.parent_run_id)
    assert len(children) == 4 and {c.info.run_id for c in children} == {t["run_id"] for t in result.trials}
    client = MlflowClient(cfg.tracking_uri)
    by_run = {t["run_id"]: t for t in result.trials}
    for child in children:
        trial = by_run[child.info.run_id]
        params, tags = child.data.params, child.data.tags
        assert float(params["xgboost.eta"]) == pytest.approx(trial["config"]["eta"])
        assert int(params["xgboost.max_depth"]) == trial["config"]["max_depth"] and 1 <= trial["config"]["max_depth"] <= 6
        assert params["ray.num_workers"] == "2"  # the trainer of `churn train`, with its workers
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "valid_auc")
        steps = sorted(m.step for m in history)
        if trial["status"] == "completed":
            assert tags["churn.trial.status"].startswith("completed")
            n = int(child.data.metrics["num_boosted_rounds"])
            assert steps == list(range(n))  # every iteration
            assert child.data.metrics["best_valid_auc"] == pytest.approx(trial["score"])
        else:
            assert tags["churn.trial.status"] == f"stopped early by ASHA at round {trial['rounds']}"
            assert trial["rounds"] < 30 and steps and steps[-1] == trial["rounds"] - 1


def test_asha_stopped_at_least_one_trial(sweep):
    _, result, said = sweep
    stopped = [t for t in result.trials if t["status"] == "stopped"]
    assert stopped, [(t["status"], t["rounds"]) for t in result.trials]
    assert any("stopped early by ASHA" in line for line in said)


def test_register_best_puts_the_best_trial_at_staging(sweep):
    cfg, result, _ = sweep
    info = Registry(cfg, say=lambda m: None).alias("staging")
    assert info is not None and info.version == result.registered_version
    assert info.run_id == result.best["run_id"]
    raw = next(iter_chunks(20, seed=4, chunk_rows=20))
    out = mlflow.pyfunc.load_model(f"models:/{cfg.model.registered_name}@staging").predict(raw)
    assert out["churn_probability"].between(0, 1).all() and len(out) == 20
    # the trial's hyperparameters are in the logged model's run, as with churn train
    run = MlflowClient(cfg.tracking_uri).get_run(info.run_id)
    assert float(run.data.params["xgboost.eta"]) == pytest.approx(result.best["config"]["eta"])


def test_bad_search_space_is_refused_before_anything_starts(tmp_path):
    res = run_cli("tune", "--set", "tune.search_space={eta: {distribution: normal, low: 0.01, high: 0.3}}", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: config: tune.search_space.eta.distribution: Input should be 'uniform', 'loguniform', 'randint' "
        "or 'choice' (got 'normal')"
    )
    res = run_cli("tune", "--set", "tune.search_space={max_depth: {distribution: randint, low: 2, high: 99}}", cwd=tmp_path)
    assert res.returncode == 2 and "max_depth: 99 is not a valid xgboost.max_depth" in res.stderr
    res = run_cli("tune", "--num-samples", "0", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "error: --num-samples must be at least 1 (got 0)"
    assert not (tmp_path / ".churn").exists()  # nothing was started or written


def test_an_interrupted_sweep_resumes(tmp_path):
    """Ctrl-C after the first trial; --resume finishes the sweep in the same parent run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    sets = [a for k, v in {**SWEEP, "tune.num_samples": 3, "tune.scheduler": "none", "tune.name": "resume-me",
                           "xgboost.num_boost_round": 40, "xgboost.early_stopping_rounds": 0,
                           "training.checkpoint_every": 10, "workspace": str(tmp_path / ".churn")}.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]
    log = tmp_path / "first.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "churnlib", "tune", *sets], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    state = tmp_path / ".churn" / "ray_results" / "resume-me.churn_sweep.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if "  trial " in log.read_text():  # the first trial finished
            break
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)
    assert proc.returncode == 130, log.read_text()[-3000:]
    first = json.loads(state.read_text())
    parent = first["parent_run_id"]
    assert 1 <= len(first["trial_runs"]) <= 3

    res = subprocess.run([sys.executable, "-m", "churnlib", "tune", "--resume", "resume-me", "--json", *sets],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["parent_run_id"] == parent and len(out["trials"]) == 3
    assert all(t["status"] == "completed" for t in out["trials"])
    cfg = make_config(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(parent).info.status == "FINISHED"
    children = _children(cfg, parent)
    assert len(children) == 3  # no trial logged twice
    assert {c.info.run_id for c in children} == {t["run_id"] for t in out["trials"]}
    assert all(c.info.status == "FINISHED" for c in children)
