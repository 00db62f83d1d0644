"""Real training: one Ray task for a small table (2 Ray Train workers where asked for, and for the
worker-kill and streaming paths), a real MLflow store, the logged pyfunc on raw records."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from mlflow import MlflowClient

from churnlib.data.features import FeatureSpec, to_matrix
from churnlib.data.generation import generate, iter_chunks
from churnlib.errors import DataError, ResourceError
from churnlib.train.command import train
from tests.conftest import KAGGLE_TEST, make_config, require_shared, run_cli


@pytest.fixture(scope="module")
def trained_once(ray_session, tmp_path_factory):
    ws = tmp_path_factory.mktemp("train")
    cfg = make_config(ws)
    messages: list[dict] = []
    result = train(cfg, run_name="unit-train", say=lambda m: None, on_progress=messages.append)
    return cfg, result, messages


@pytest.fixture
def trained(trained_once):
    """The shared small run, with MLflow pointed at its store (other tests point it elsewhere)."""
    mlflow.set_tracking_uri(trained_once[0].tracking_uri)
    return trained_once


def test_run_is_finished_with_every_resolved_config_value_as_param(trained):
    cfg, result, _ = trained
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-train"
    params = run.data.params
    flat = cfg.flat()
    assert set(flat) <= set(params)
    assert params["xgboost.max_depth"] == "4" and params["ray.num_workers"] == "2"
    assert json.loads(params["features.categorical"])["Contract Length"] == ["Monthly", "Quarterly", "Annual"]
    assert run.data.tags["ray_version"] and run.data.tags["xgboost_version"] == xgb.__version__
    assert run.data.tags["data.digest"] == result.data_digest


def test_metric_history_has_one_point_per_iteration(trained):
    _, result, _ = trained
    client = MlflowClient()
    n = result.num_boosted_rounds
    # MLflow's sections: learning curves under train/ and valid/ (issue: 31 charts in one list)
    for key in ("valid/auc", "valid/logloss", "valid/error", "train/auc"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == list(range(n)), key
    aucs = {m.step: m.value for m in client.get_metric_history(result.run_id, "valid/auc")}
    best = result.best_iteration
    assert aucs[best] == max(aucs.values())
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["best/valid_auc"] == pytest.approx(aucs[best])
    assert metrics["best/iteration"] == best
    assert metrics["rows/train"] + metrics["rows/valid"] == 4000 and metrics["rows/dropped_empty"] == 0
    assert metrics["time/total_s"] > metrics["time/fit_s"] > 0
    assert all("/" in key for key in metrics), sorted(k for k in metrics if "/" not in k)
    assert 0.8 < result.metrics["best_valid_auc"] <= 1.0  # --json keeps the plain names
    # the logged model carries the best iteration's metrics (issue: round 1's), with its dataset
    model = client.get_logged_model(result.extra["logged_model_uri"].rsplit("/", 1)[-1])
    on_model = {m.key: m for m in model.metrics or []}
    assert on_model["best/valid_auc"].value == pytest.approx(aucs[best])
    assert on_model["best/valid_auc"].dataset_digest == result.data_digest
    assert on_model["valid/auc"].value == pytest.approx(aucs[best])  # the curve at the best round, not round 1
    assert not any(k.startswith("time/") for k in on_model)


def test_early_stopping_keeps_trees_up_to_the_best_iteration(trained):
    cfg, result, _ = trained
    client = MlflowClient()
    path = client.download_artifacts(result.run_id, "booster/booster.ubj")
    booster = xgb.Booster(model_file=path)
    assert booster.num_boosted_rounds() == result.best_iteration + 1
    stopped = client.get_run(result.run_id).data.metrics["training/stopped_early"] == 1.0
    if stopped:
        assert result.num_boosted_rounds == result.best_iteration + 1 + cfg.xgboost.early_stopping_rounds
    else:
        assert result.num_boosted_rounds == cfg.xgboost.num_boost_round


def test_artifacts_importance_config_report_and_dataset(trained):
    cfg, result, _ = trained
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"feature_importance.json", "feature_importance.png", "config", "data", "booster"} <= names
    imp = json.loads(Path(client.download_artifacts(result.run_id, "feature_importance.json")).read_text())
    spec = FeatureSpec.from_config(cfg.features)
    assert set(imp) == {"gain", "weight", "cover"} and set(imp["gain"]) == set(spec.feature_names)
    assert max(imp["gain"], key=imp["gain"].get) in ("Support Calls", "Contract Length", "Payment Delay", "Age")
    resolved = Path(client.download_artifacts(result.run_id, "config/resolved_config.yaml")).read_text()
    assert "max_depth: 4" in resolved
    report = json.loads(Path(client.download_artifacts(result.run_id, "data/validation_report.json")).read_text())
    assert report["rows"] == 4000
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == result.data_digest
    assert inputs[0].tags[0].value == "training"


def test_pyfunc_predicts_on_raw_records(trained):
    cfg, result, _ = trained
    model = mlflow.pyfunc.load_model(result.model_uri)
    raw = next(iter_chunks(50, seed=99, chunk_rows=50))  # ints, strings, an id and the target column
    out = model.predict(raw)
    assert list(out.columns) == ["churn_probability", "churn_label", "expected_value", "contact"] and len(out) == 50
    assert out["churn_probability"].between(0, 1).all()
    assert (out["churn_label"] == (out["churn_probability"] >= cfg.model.decision_threshold)).all()
    # the decision the model was trained with: P x save rate x value saved - contact cost, contact from
    # the threshold chosen on the validation rows
    d = cfg.decision
    assert out["expected_value"].to_numpy() == pytest.approx(
        out["churn_probability"].to_numpy() * d.save_rate * d.value_saved - d.contact_cost)
    cut = result.metrics["decision_contact_threshold"]
    assert (out["contact"] == (out["churn_probability"] >= cut)).all() and out["contact"].dtype == bool
    # the same numbers as the booster alone on the same feature function, through the Platt map
    # the model carries (fitted on the validation rows: model.calibration is platt by default)
    from churnlib.model.loading import load

    booster = xgb.Booster(model_file=MlflowClient().download_artifacts(result.run_id, "booster/booster.ubj"))
    spec = FeatureSpec.from_config(cfg.features)
    cal = load(result.model_uri).predictor.meta["calibration"]
    assert cal["method"] == "platt" and cal["rows"] == result.rows["valid"]
    margin = booster.inplace_predict(to_matrix(raw, spec), predict_type="margin").astype(np.float64)
    np.testing.assert_allclose(out["churn_probability"], 1 / (1 + np.exp(-(cal["a"] * margin + cal["b"]))), rtol=1e-6)
    assert result.metrics["calibration_valid_ece_after"] <= result.metrics["calibration_valid_ece_before"]
    # the signature types the integer columns `long` (the table had no hole in them): MLflow
    # refuses a float column there with its hint on missing values, before the model sees it
    holes = raw.head(3).astype({"Age": "float64"})
    holes.loc[0, "Age"] = np.nan
    with pytest.raises(Exception, match="Age.*missing values"):
        model.predict(holes)
    # an unknown category is churn's one-line error
    bad = raw.head(3).copy()
    bad.loc[1, "Gender"] = "Unknown"
    with pytest.raises(Exception, match="unknown category"):
        model.predict(bad)


def test_pyfunc_on_the_real_kaggle_rows(trained):
    _, result, _ = trained
    df = pd.read_csv(require_shared(KAGGLE_TEST), nrows=200)
    out = mlflow.pyfunc.load_model(result.model_uri).predict(df)
    assert len(out) == 200 and out["churn_probability"].between(0, 1).all()


def test_a_small_table_trains_in_one_task(trained):
    """training.engine auto: the 4,000-row table was read in the driver, so it was boosted in one
    Ray task with both CPUs as threads; the run says so."""
    _, result, _ = trained
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["churn.train_engine"] == "task" and run.data.params["training.engine"] == "auto"
    assert result.restarts == 0 and result.timings["workers_up_s"] < result.timings["fit_s"]


def test_progress_reaches_the_driver(trained):
    _, result, messages = trained
    rounds = [m for m in messages if m["kind"] == "round"]
    assert rounds and rounds[-1]["iteration"] == result.num_boosted_rounds - 1
    assert all("valid-auc" in m["metrics"] for m in rounds)
    checkpoints = [m["iteration"] for m in messages if m["kind"] == "checkpoint"]
    assert checkpoints == [i for i in (9, 19, 29) if i < result.num_boosted_rounds - 1]


def test_bad_data_marks_the_run_failed(ray_session, cfg_factory, workspace):
    path = workspace / "bad.csv"
    df = next(iter_chunks(300, seed=2, chunk_rows=300)).astype(object)
    df.loc[5, "Churn"] = "maybe"
    df.to_csv(path, index=False)
    cfg = cfg_factory()
    with pytest.raises(DataError, match="neither 1 nor 0"):
        train(cfg, data_path=str(path), say=lambda m: None)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment_name])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FAILED"
    assert "neither 1 nor 0" in runs.iloc[0]["tags.error"]


def test_a_bad_table_with_no_ray_up_is_named_on_ray_data_then_one_line(tmp_path):
    """`churn train` with no Ray instance up would boost in its own process; a table that does not
    read cleanly there starts Ray only to name its problem (the Ray Data pass): one line, exit 2,
    the run FAILED, no model."""
    path = tmp_path / "bad.csv"
    df = next(iter_chunks(300, seed=2, chunk_rows=300)).astype(object)
    df.loc[5, "Age"] = "forty"
    df.to_csv(path, index=False)
    ws = tmp_path / ".churn"  # make_config(tmp_path)'s
    res = run_cli("train", "--data", str(path), "--set", f"workspace={ws}", cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Age" in last and "forty" in last and "Traceback" not in res.stderr
    cfg = make_config(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    exp_id = client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id
    runs = client.search_runs([exp_id])
    assert [r.info.status for r in runs] == ["FAILED"] and "Age" in runs[0].data.tags["error"]
    assert len(client.search_logged_models([exp_id])) == 0


def test_gpus_on_a_cluster_without_them_fail_at_once(ray_session, cfg_factory):
    """ray.use_gpu on this GPU-less instance: a clear error, no hang, no run left behind."""
    cfg = cfg_factory(ray__use_gpu=True, ray__resources_timeout_s=0)
    with pytest.raises(ResourceError, match=r"ray.use_gpu asks for 2 GPU\(s\).*has 0"):
        train(cfg, say=lambda m: None)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment_name)
    assert exp is None or mlflow.search_runs([exp.experiment_id]).empty


def test_too_many_workers_fail_at_once(ray_session, cfg_factory):
    cfg = cfg_factory(ray__num_workers=8, ray__resources_timeout_s=0)
    with pytest.raises(ResourceError, match="need 8 CPUs"):
        train(cfg, say=lambda m: None)


def _checkpoint_with_rounds(result, rounds: int) -> Path:
    """The checkpoint folder of a run whose model holds ``rounds`` trees (before any restore)."""
    root = Path(result.extra["checkpoint_path"]).parent
    for d in sorted(root.glob("checkpoint_*")):
        state = json.loads((d / "train_state.json").read_text())
        if d.is_dir() and len(state["history"]["valid-auc"]) == rounds and state["restarts"] == 0:
            return d
    raise AssertionError(f"no checkpoint with {rounds} rounds under {root}")


def _booster(run_id: str) -> xgb.Booster:
    return xgb.Booster(model_file=MlflowClient().download_artifacts(run_id, "booster/booster.ubj"))


@pytest.mark.parametrize("engine", ["ray_train", "task"])
def test_a_recovered_worker_failure_logs_the_model_of_a_resume_without_one(ray_session, cfg_factory, workspace,
                                                                             engine):
    """Kill a real Ray Train worker (or the one task's process) after a checkpoint. The run
    restores from it and must log exactly the model, history and early-stopping outcome of a run
    that resumed from the same checkpoint without a kill (issue: the restored run counted rounds
    from 0 again and logged best_iteration 40 of a history peaking at 100, with 41 trees)."""
    settings = dict(
        training__engine=engine,
        xgboost__num_boost_round=300,
        xgboost__early_stopping_rounds=25,
        xgboost__eta=0.05,
        training__checkpoint_every=5,
        training__progress_interval_s=0.0,
        training__max_failures=2,
        training__keep_checkpoints=None,
    )
    cfg = cfg_factory(**settings)
    killed: dict = {}
    messages: list[dict] = []
    lock = threading.Lock()

    def on_progress(msg):
        with lock:
            messages.append(msg)
            if not killed and msg["kind"] == "checkpoint" and msg["iteration"] >= 9:
                os.kill(msg["pid"], signal.SIGKILL)
                killed.update(pid=msg["pid"], after=msg["iteration"])

    faulty = train(cfg, run_name="killed", say=lambda m: None, on_progress=on_progress)
    assert killed, "the test never saw a checkpoint to kill after"
    assert faulty.restarts == 1
    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient()
    assert client.get_run(faulty.run_id).data.tags["churn.train_engine"] == engine
    assert client.get_run(faulty.run_id).data.metrics["training/worker_restarts"] == 1
    history = client.get_metric_history(faulty.run_id, "valid/auc")
    steps = sorted(m.step for m in history)
    assert steps == list(range(faulty.num_boosted_rounds))  # no gap, no duplicate
    aucs = {m.step: m.value for m in history}
    # the logged best iteration is the history's best, and the model keeps exactly its trees
    assert aucs[faulty.best_iteration] == max(aucs.values())
    assert faulty.best_iteration == min(s for s, v in aucs.items() if v == max(aucs.values()))
    assert _booster(faulty.run_id).num_boosted_rounds() == faulty.best_iteration + 1
    stopped = faulty.num_boosted_rounds < 300
    assert not stopped or faulty.num_boosted_rounds == faulty.best_iteration + 1 + 25

    # progress carried on from the restored round, not from round 1
    restored = [m for m in messages if m["kind"] == "round" and m["restarts"] == 1]
    resumed_at = restored[0]["iteration"]
    # the first round after a checkpoint, counted absolutely, never round 1 again: the checkpoint Ray
    # Train had registered when the kill landed (the progress line that triggers it arrives a little
    # after the worker wrote it, so training may have gone on by then), and no later than it had got
    before = max(m["iteration"] for m in messages if m["kind"] == "round" and m["restarts"] == 0)
    assert 5 <= resumed_at <= before + 1 and resumed_at % 5 == 0, (resumed_at, before, killed)
    assert [m["iteration"] for m in restored] == sorted({m["iteration"] for m in restored})

    # the same checkpoint, resumed without a kill: the same model to the last tree
    checkpoint = _checkpoint_with_rounds(faulty, resumed_at)
    clean = train(cfg_factory(**settings, training__resume_from=str(checkpoint)), run_name="resumed",
                  say=lambda m: None)
    assert clean.restarts == 0
    assert (clean.best_iteration, clean.num_boosted_rounds) == (faulty.best_iteration, faulty.num_boosted_rounds)
    for key in ("valid/auc", "valid/logloss", "train/auc"):
        a = [m.value for m in sorted(client.get_metric_history(faulty.run_id, key), key=lambda m: m.step)]
        b = [m.value for m in sorted(client.get_metric_history(clean.run_id, key), key=lambda m: m.step)]
        assert a == pytest.approx(b, abs=1e-9), key
    raw = next(iter_chunks(2000, seed=5, chunk_rows=2000))
    spec = FeatureSpec.from_config(cfg.features)
    X = to_matrix(raw, spec)
    p_faulty, p_clean = _booster(faulty.run_id).inplace_predict(X), _booster(clean.run_id).inplace_predict(X)
    np.testing.assert_allclose(p_faulty, p_clean, atol=1e-6)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(raw["Churn"], p_faulty) == pytest.approx(roc_auc_score(raw["Churn"], p_clean), abs=1e-6)
    assert client.get_run(clean.run_id).data.tags["churn.resumed_from"] == str(checkpoint)


@pytest.mark.unit
def test_resume_from_something_that_is_not_a_checkpoint_is_one_line(tmp_path):
    res = run_cli("train", "--resume-from", str(tmp_path), "--set", f"workspace={tmp_path / 'ws'}", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: training.resume_from {tmp_path}: not a training checkpoint")


@pytest.mark.parametrize(("signame", "group", "code", "attached", "engine"),
                         [("SIGINT", True, 130, False, "task"), ("SIGINT", True, 130, False, "process"),
                          ("SIGTERM", False, 143, True, "task")])
def test_ctrl_c_and_sigterm_end_the_run_killed(ray_session, tmp_path, signame, group, code, attached, engine):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM (to the process, as
    systemd, Docker and Kubernetes send it) mid-training: one line, 130/143, the run KILLED, no Ray
    process left, and the checkpoint to continue from (issue: Ctrl-C exited 1 with no line, FAILED).
    SIGINT on the instance the command starts (every process of it ends), and in the command's
    own process (``auto`` with no Ray up: the boosting stops between two rounds); SIGTERM on an
    instance that stays up (the session's, as `churn up`'s would): the training task it started
    ends with it, and the instance gets its CPUs back."""
    import time

    from tests.conftest import alive, cli_env, session_ray_env, signal_cli

    ws = tmp_path / ".churn"
    args = ["train", "--set", f"workspace={ws}", "--set", "data.generate_rows=4000",
            "--set", "xgboost.num_boost_round=3000", "--set", "xgboost.early_stopping_rounds=0",
            "--set", "xgboost.eta=0.01", "--set", "training.checkpoint_every=5", "--set", "training.progress_interval_s=0.2"]
    if engine == "task" and not attached:
        args += ["--set", "training.engine=task"]  # auto would boost in the command's process
    env = cli_env(**session_ray_env()) if attached else None
    rc, err, took, tree = signal_cli(args, "checkpoint at round", getattr(signal, signame), group, tmp_path, env=env)
    if attached:  # the task held both CPUs of the instance; they come back once it is gone
        deadline = time.monotonic() + 30
        while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
            assert time.monotonic() < deadline, ray_session.available_resources()
            time.sleep(0.2)
    lines = err.strip().splitlines()
    assert rc == code, err[-3000:]
    assert lines[-1] == "error: interrupted" and "Traceback" not in err
    hint = [line for line in lines if "churn train --resume-from" in line]
    assert hint and Path(hint[0].rsplit(" ", 1)[1], "train_state.json").is_file()
    assert took < 30
    assert alive(tree) == []
    cfg = make_config(tmp_path)
    runs = mlflow.MlflowClient(cfg.tracking_uri).search_runs(
        [mlflow.MlflowClient(cfg.tracking_uri).get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags["error"] == f"Interrupted: {signame}"
    assert runs[0].data.tags["churn.train_engine"] == engine
    assert ("ray: started a local instance" in err) is (engine == "task" and not attached)


def test_streaming_without_a_spare_cpu_is_refused_not_hung(ray_session, cfg_factory):
    cfg = cfg_factory(training__materialize=False, ray__resources_timeout_s=0)
    with pytest.raises(ResourceError, match="Ray Data would get none"):
        train(cfg, say=lambda m: None)


def test_cli_train_json_on_the_streaming_path(ray_session, tmp_path):
    """The real `churn train` command, streaming the table (workers of half a CPU leave one for Ray Data)."""
    data = generate(3000, tmp_path / "t.csv", seed=11)
    res = run_cli(
        "train", "--data", str(data), "--json", "--run-name", "cli",
        "--set", "xgboost.num_boost_round=20", "--set", "training.materialize=false",
        "--set", "ray.cpus_per_worker=0.5", "--set", f"workspace={tmp_path / 'ws'}",
        cwd=tmp_path,
        timeout=300,
        attach=True,  # on the session's instance, as after `churn up`: a command that only needs a cluster
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["run_id"] and out["model_uri"] == f"runs:/{out['run_id']}/model"
    assert out["rows"]["train"] + out["rows"]["valid"] == 3000
    assert 0.5 < out["metrics"]["best_valid_auc"] <= 1.0
    assert "round" in res.stderr  # progress for a person, on stderr
    assert "INFO" not in res.stderr  # Ray's and MLflow's chatter stays quiet
    # the contact threshold, chosen on validation rows scored where the streamed table lies
    assert 0 < out["metrics"]["decision_contact_threshold"] < 1 and out["metrics"]["decision_valid_contacts"] > 0
    assert "decision: contact from P >= " in res.stderr


def test_gpu_setting_reaches_the_trainer_and_xgboost(ray_session, cfg_factory):
    """No GPU here: check what a GPU run would ask Ray for and tell XGBoost."""
    import ray.data

    from churnlib.train.trainer import build_trainer, loop_config

    cfg = cfg_factory(ray__use_gpu=True)
    spec = FeatureSpec.from_config(cfg.features)
    trainer = build_trainer(cfg, ray.data.range(4), loop_config(cfg, spec))
    scaling = trainer.scaling_config
    assert scaling.use_gpu is True and scaling.num_workers == 2
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1}
    assert loop_config(cfg, spec)["params"]["device"] == "cuda"
    cpu = cfg_factory()
    cpu_trainer = build_trainer(cpu, ray.data.range(4), loop_config(cpu, spec))
    assert cpu_trainer.scaling_config.use_gpu is False
    assert loop_config(cpu, spec)["params"]["device"] == "cpu"


def test_model_has_signature_and_input_example(trained):
    _, result, _ = trained
    from mlflow.models import Model

    info = mlflow.models.get_model_info(result.model_uri)
    inputs = [c["name"] for c in info.signature.inputs.to_dict()]
    assert inputs == ["Age", "Tenure", "Usage Frequency", "Support Calls", "Payment Delay", "Total Spend",
                      "Last Interaction", "Gender", "Subscription Type", "Contract Length"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["churn_probability", "churn_label",
                                                                      "expected_value", "contact"]
    # typed as the training table: integers `long` (no hole in them), categories strings (issue 14: `any`)
    types = {c["name"]: c["type"] for c in info.signature.inputs.to_dict()}
    assert set(types.values()) == {"long", "string"} and types["Age"] == "long" and types["Gender"] == "string"
    example = Model.load(result.model_uri).load_input_example(mlflow.artifacts.download_artifacts(result.model_uri))
    assert len(example) >= 1 and set(inputs) <= set(example.columns) and str(example["Age"].dtype) == "int64"


def test_unreachable_tracking_server_is_one_line_exit_1(tmp_path):
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    res = run_cli("train", "--set", f"mlflow.tracking_uri={uri}", "--set", "data.generate_rows=200", cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"error: MLflow tracking server unreachable at {uri}"
    assert "Traceback" not in res.stderr


@pytest.mark.unit
@pytest.mark.parametrize(("metric", "xgb_name"), [("auc", "auc"), ("logloss", "logloss"), ("error@0.5", "error")])
def test_early_stopping_matches_xgboosts_own(metric, xgb_name):
    """Our restartable early stopping picks the same best iteration as XGBoost's EarlyStopping."""
    from churnlib.data.preparation import encode_batch
    from churnlib.train.loop import _make_callback

    cfg = make_config(Path("."), xgboost__eta=0.3, xgboost__max_depth=3)
    spec = FeatureSpec.from_config(cfg.features)
    raw = next(iter_chunks(3000, seed=21, chunk_rows=3000))
    enc = encode_batch(raw, spec, spec.feature_names + ["Churn"], 0.3, 1)
    kw = dict(feature_names=spec.feature_names, feature_types=spec.feature_types, enable_categorical=True)
    tr, va = ~enc["is_valid"], enc["is_valid"]
    dtrain = xgb.DMatrix(enc["X"][tr], label=enc["y"][tr], **kw)
    dvalid = xgb.DMatrix(enc["X"][va], label=enc["y"][va], **kw)
    params = {**cfg.xgb_params(), "eval_metric": [metric], "subsample": 1.0, "colsample_bytree": 1.0}
    state = {"history": {}, "best_iteration": None, "best_score": None, "stopped_early": False,
             "boosting_seconds": 0.0, "restarts": 0}
    config = {"stopping_metric": metric, "early_stopping_rounds": 5, "checkpoint_every": 0,
              "progress_interval_s": 0.0, "num_boost_round": 300}
    ours = xgb.train(params, dtrain, 300, evals=[(dvalid, "valid")], verbose_eval=False,
                     callbacks=[_make_callback(config, state, 0, None)])
    theirs = xgb.train(params, dtrain, 300, evals=[(dvalid, "valid")], verbose_eval=False,
                       callbacks=[xgb.callback.EarlyStopping(rounds=5, metric_name=xgb_name)])
    assert state["stopped_early"] and ours.num_boosted_rounds() < 300
    assert state["best_iteration"] == theirs.best_iteration
    assert ours.num_boosted_rounds() == theirs.num_boosted_rounds()


@pytest.mark.parametrize("workers", [1, 3])
def test_shards_cover_every_row_once_for_any_worker_count(ray_session, workers):
    """One fixed contiguous shard per rank, balanced to a row, none dropped; one worker gets the
    whole table (issue: `ray.num_workers=1` failed with "indices must be at least of length 1")."""
    import ray

    from churnlib.train.trainer import shard_datasets

    table = ray.data.range(1000, override_num_blocks=4).materialize()
    datasets, data_config = shard_datasets(table, workers)
    assert sorted(datasets) == [f"data_{i}" for i in range(workers)]
    counts = [datasets[f"data_{i}"].count() for i in range(workers)]
    assert sum(counts) == 1000 and max(counts) - min(counts) <= 1
    ids = [row["id"] for i in range(workers) for row in datasets[f"data_{i}"].take_all()]
    assert sorted(ids) == list(range(1000))  # every row once
    # contiguous pieces of the materialized table, in its block order (materializing may put the
    # blocks in any order; what a restart needs is that the same table gives the same shards)
    assert ids == [row["id"] for row in table.take_all()]
    assert [r["id"] for r in datasets["data_0"].take_all()] == [r["id"] for r in datasets["data_0"].take_all()]
    assert data_config is not None


def test_the_model_contacts_from_the_cut_worth_most_on_its_validation_rows(trained):
    """decision.threshold auto: the threshold the model carries is the best of every distinct cut
    on the validation rows (brute force over the same rows, scored by the logged booster)."""
    from churnlib.data.preparation import prepare
    from churnlib.data.sources import check_columns, resolve_source
    from churnlib.model.loading import load
    from churnlib.train.command import default_data_path
    from churnlib.train.decide import validation_scores

    cfg, result, _ = trained
    predictor = load(result.model_uri).predictor
    chosen = predictor.meta["decision"]
    assert chosen["threshold_source"] == "auto" and chosen["threshold"] == result.metrics["decision_contact_threshold"]
    spec = predictor.spec
    source = resolve_source(str(default_data_path(cfg)))
    prepared = prepare(source, spec, check_columns(source, spec), cfg.model.validation_split, cfg.model.random_state)
    p, y = validation_scores(prepared, predictor.booster, predictor.calibrator)
    assert len(p) == result.rows["valid"]
    d = cfg.decision
    worth = [float(v) * d.save_rate * d.value_saved - d.contact_cost for v in y]
    best = max((sum(w for w, q in zip(worth, p) if q >= t), t) for t in set(p.tolist()))
    assert chosen["threshold"] == pytest.approx(best[1])
    assert result.metrics["decision_valid_value_per_customer"] == pytest.approx(best[0] / len(p))
    assert 0 < chosen["threshold"] < 1 and result.metrics["decision_valid_contacts"] > 0
