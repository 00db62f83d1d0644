"""`churn tune`: a real small sweep on the session's Ray instance; parent and child runs in MLflow,
ASHA stopping trials, --register-best, a bad search space refused up front, resume after an interruption.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from churnlib.data.generation import iter_chunks
from churnlib.registry.registry import Registry
from churnlib.tune.command import tune
from tests.conftest import S3_KEYS, make_config, run_cli

SWEEP = {
    "tune.num_samples": 4,
    "tune.max_concurrent": 1,  # one after another: ASHA's decisions do not depend on timing
    "tune.search": "random",
    "tune.seed": 4,  # trials in an order where ASHA stops two (seed 3 drew four better and better ones)
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
    """The real `churn tune --register-best --json`, in a process of its own BESIDE the session's
    Ray instance: Ray Train's placement-group cleaner must find its own instance to release the
    CPUs of a trial ASHA stopped (issue: it found several, failed, and the sweep hung)."""
    from types import SimpleNamespace

    ws = tmp_path_factory.mktemp("tune")
    cfg = make_config(ws, **SWEEP)
    sets = [a for k, v in {**SWEEP, "workspace": str(ws / ".churn")}.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]
    res = run_cli("tune", "--register-best", "--json", *sets, cwd=ws, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow.set_tracking_uri(cfg.tracking_uri)
    return cfg, SimpleNamespace(**json.loads(res.stdout)), res.stderr.splitlines()


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
    assert parent.data.metrics["best/valid_auc"] == pytest.approx(result.best["score"])
    assert parent.data.metrics["time/sweep_s"] > 0
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
        # a name a person can read (issue: every trial showed the same truncated "churn-tune-202...")
        assert re.fullmatch(r"trial 0[1-4]: eta [\d.e-]+, max_depth \d, subsample [\d.]+", child.info.run_name)
        # the sweep's lineage on every trial: source, git commit, data (issue: none of them)
        parent_tags = client.get_run(result.parent_run_id).data.tags
        for key in ("mlflow.source.name", "mlflow.user", "data.digest", "data.source"):
            assert tags[key] == parent_tags[key], key
        assert "mlflow.source.git.commit" not in parent_tags or tags["mlflow.source.git.commit"] == parent_tags[
            "mlflow.source.git.commit"]
        assert [d.dataset.digest for d in child.inputs.dataset_inputs] == [tags["data.digest"]]
        history = client.get_metric_history(child.info.run_id, "valid/auc")
        steps = sorted(m.step for m in history)
        if trial["status"] == "completed":
            assert tags["churn.trial.status"].startswith("completed")
            n = int(child.data.metrics["training/num_boosted_rounds"])
            assert steps == list(range(n))  # every iteration
            assert child.data.metrics["best/valid_auc"] == pytest.approx(trial["score"])
        else:
            assert tags["churn.trial.status"] == f"stopped early by ASHA at round {trial['rounds']}"
            assert trial["rounds"] < 30 and steps and steps[-1] == trial["rounds"] - 1


def test_asha_stopped_at_least_one_trial(sweep):
    _, result, said = sweep
    stopped = [t for t in result.trials if t["status"] == "stopped"]
    assert stopped, [(t["status"], t["rounds"]) for t in result.trials]
    assert any("stopped early by ASHA" in line for line in said)


def test_the_terminal_follows_each_trial_and_sums_the_sweep_up(sweep):
    """A line when a trial starts and progress while it runs (issue: nothing while a trial ran),
    then one line summing the sweep up; none of Tune's own tables or hints."""
    _, result, said = sweep
    for n in range(1, 5):
        assert any(line.startswith(f"  [trial 0{n}] started: eta ") for line in said), n
    assert any(re.match(r"  \[trial 0\d\] round \d+, best_valid_auc 0\.\d{4}$", line) for line in said), said
    assert any(re.match(r"  trial 0\d: (completed|stopped early by ASHA)", line) for line in said), said
    stopped = sum(t["status"] == "stopped" for t in result.trials)
    summary = next(line for line in said if re.match(r"tune: 4 trial\(s\) in [\d.]+ s: ", line))
    assert f"{stopped} stopped early by ASHA, 0 failed" in summary
    assert f"{sum(t['rounds'] for t in result.trials):,} boosting rounds of 120 possible" in summary
    assert not [line for line in said if "Trial status" in line or "tensorboard" in line.lower() or "╭" in line]


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


@pytest.mark.unit
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


def test_an_interrupted_sweep_resumes_with_the_printed_command(ray_session, tmp_path):
    """SIGTERM during the first trial (143, the parent run KILLED); the command it prints, and
    nothing else, finishes the sweep: the same data, trial count and --register-best, in the same
    parent run, whose sweep time covers both sessions (issue: the printed command trained on other
    data, said "interrupted" again and skipped --register-best; sweep_s 0.10 s)."""
    import shlex

    from tests.conftest import cli_env, session_ray_env, signal_cli

    data = tmp_path / "sweep.parquet"
    from churnlib.data.generation import generate

    generate(3000, data, seed=7)
    # trials long enough to be caught running (a trial of SWEEP ends in a fraction of a second in a
    # reused process, and the signal could land after the sweep had finished)
    long = {"xgboost.num_boost_round": 1500, "xgboost.eta": 0.01, "xgboost.early_stopping_rounds": 0}
    sets = [a for k, v in {**SWEEP, **long, "tune.name": "resume-me", "workspace": str(tmp_path / ".churn")}.items()
            if k != "tune.num_samples" for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")]
    args = ["tune", "--data", data, "--num-samples", "2", "--register-best", *sets]
    # both sessions on the suite's instance, as after `churn up` (the sweep fixture runs one beside it)
    # (signalled after a trial ended, the sweep could still end by itself: the next trial, stopped by
    # ASHA at its first rung, was the last one)
    rc, err, took, _ = signal_cli(args, "[trial 01] round", signal.SIGTERM, False, tmp_path, timeout=400,
                                  env=cli_env(**session_ray_env()))
    assert rc == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted"
    printed = [line.split("resume with: ", 1)[1] for line in err.splitlines() if "resume with: " in line]
    assert printed and printed[-1] == "churn tune --resume resume-me"  # the workspace is the default here
    state = json.loads((tmp_path / ".churn" / "ray_results" / "resume-me.churn_sweep.json").read_text())
    parent = state["parent_run_id"]
    first_session = state["sweep_s"]
    assert first_session > 0.5 and state["data"] == str(data) and state["register_best"] is True
    cfg = make_config(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(parent).info.status == "KILLED"

    # other data: refused before anything starts
    other = generate(3000, tmp_path / "other.parquet", seed=8)
    res = run_cli("tune", "--resume", "resume-me", "--data", str(other), "--set", f"workspace={tmp_path / '.churn'}",
                  cwd=tmp_path)
    assert res.returncode == 2 and "--data is not the table the sweep started on" in res.stderr.strip().splitlines()[-1]

    command = shlex.split(printed[-1])
    assert command[:2] == ["churn", "tune"]
    res = subprocess.run([sys.executable, "-m", "churnlib", *command[1:], "--json"], cwd=tmp_path,
                         env=cli_env(**session_ray_env()),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["parent_run_id"] == parent and len(out["trials"]) == 2
    assert all(t["status"] in ("completed", "stopped") for t in out["trials"])
    assert out["registered_version"] == "1"
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["data.digest"] == state["data_digest"]
    assert run.data.metrics["time/sweep_s"] > first_session
    children = _children(cfg, parent)
    assert len(children) == 2  # no trial logged twice
    assert {c.info.run_id for c in children} == {t["run_id"] for t in out["trials"]}
    assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.parametrize(("engine", "wait_s"), [("task", 10), ("ray_train", 15)])
def test_a_trial_that_cannot_get_its_resources_fails_the_sweep_not_hangs(ray_session, tmp_path, engine, wait_s):
    """Another job holds one of the two CPUs: the trial (its own process with two threads, or
    its two Ray Train workers) can never start. The sweep ends in one line after
    ray.resources_timeout_s (issue: it waited for ever), its run FAILED."""
    import ray

    from churnlib.errors import TrainingError

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    cfg = make_config(tmp_path, **{**SWEEP, "tune.num_samples": 2, "ray.resources_timeout_s": wait_s,
                                   "training.engine": engine})
    started = time.monotonic()
    try:
        with pytest.raises(TrainingError, match="resources") as failure:
            tune(cfg, say=lambda m: None)
    finally:
        ray.kill(holder)
    assert time.monotonic() - started < 150
    assert len(str(failure.value).splitlines()) == 1
    client = MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id],
                              filter_string="tags.`churn.command` = 'tune'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_sweep_on_ray_train_workers(ray_session, tmp_path):
    """training.engine=ray_train: every trial is a Ray Train run (two workers) reporting through
    Ray Train's TuneReportCallback; the trial ends in its MLflow child run with its metrics,
    and its checkpoint loads."""
    from churnlib.tune.trials import load_trial_checkpoint, trial_state

    cfg = make_config(tmp_path, **{**SWEEP, "tune.num_samples": 1, "training.engine": "ray_train"})
    result = tune(cfg, say=lambda m: None)
    assert [t["status"] for t in result.trials] == ["completed"]  # one trial: nothing for ASHA to stop
    done = result.trials
    assert done[0]["checkpoint_path"]
    out = load_trial_checkpoint(done[0]["checkpoint_path"])
    assert out.booster.num_boosted_rounds() == out.state["best_iteration"] + 1
    # the trial's end is logged from its state alone: the rounds it counts are the booster's
    state, rounds = trial_state(done[0]["checkpoint_path"])
    assert rounds == out.full_rounds and state["best_iteration"] == out.state["best_iteration"]
    assert out.state["worker_rows"]["train"] < 3000  # one worker's shard: the table was split between two
    client = MlflowClient(cfg.tracking_uri)
    for t in result.trials:
        metrics = client.get_run(t["run_id"]).data.metrics
        assert "valid/auc" in metrics, metrics


# The trials' MLflow writer (no Ray: Tune's callbacks called as its controller calls them) ----------------


def _logger(tmp_path, tracking_uri):
    from churnlib.tune.trials import MlflowTrials

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("sweep")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    state = str(tmp_path / "sweep.state.json")
    return MlflowTrials(tracking_uri, experiment_id, parent, {"xgboost.max_depth": 3}, "sweep", "logloss", state,
                        {}, {"train": 80.0, "valid": 20.0}), client, parent, state


@pytest.mark.unit
def test_the_callbacks_hand_their_writes_to_one_thread_that_keeps_their_order(tmp_path):
    from types import SimpleNamespace

    from churnlib.tune.state import read_state

    logger, client, parent, state_path = _logger(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = [SimpleNamespace(trial_id=f"sweep_0000{i}", config={"eta": 0.1 * (i + 1)}, last_result=None)
              for i in range(2)]
    for trial in trials:
        logger.on_trial_start(0, trials, trial)
        logger.on_trial_start(0, trials, trial)  # Tune starting it again (a restart): still one run
        for rounds in (5, 10, 15):
            logger.on_trial_result(0, trials, trial, {"rounds": rounds, "valid_logloss": 1.0 / rounds})
        trial.last_result = {"rounds": 15}
        logger.on_trial_complete(0, trials, trial)  # stopped by ASHA (not finished)
    assert logger.flush(timeout_s=60)
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["churn.trial.status"] == "stopped early by ASHA at round 15"
        history = client.get_metric_history(run.info.run_id, "valid/logloss")
        assert sorted(m.step for m in history) == [4, 9, 14]
        assert run.data.params["xgboost.eta"] in ("0.1", "0.2")
    recorded = read_state(state_path)
    assert sorted(recorded["trial_runs"]) == [t.trial_id for t in trials]
    assert recorded["ended_trials"] == [t.trial_id for t in trials]
    # what Tune pickles with the sweep carries the record, not the thread
    import pickle

    again = pickle.loads(pickle.dumps(logger))
    assert again.trial_runs == logger.trial_runs and "_writer" not in again.__dict__


@pytest.mark.unit
def test_a_store_that_fails_stops_the_sweep_at_the_next_callback_in_one_line(tmp_path):
    from types import SimpleNamespace

    from churnlib.errors import TrainingError

    logger, client, parent, _ = _logger(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "gone").write_text("")  # the store goes away: its folder is now a file
    logger.tracking_uri = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"
    trial = SimpleNamespace(trial_id="sweep_00000", config={"eta": 0.1}, last_result=None)
    logger.on_trial_start(0, [trial], trial)
    with pytest.raises(TrainingError, match=r"^writing the trials' runs to MLflow failed: .+") as err:
        logger.flush(timeout_s=60)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainingError, match="writing the trials' runs to MLflow failed"):
        logger.on_trial_result(0, [trial], trial, {"rounds": 5, "valid_logloss": 0.5})


def test_an_artifact_store_that_takes_no_writes_stops_the_sweep_in_one_line_before_any_data(
        ray_session, s3_endpoint, tmp_path):
    """The store's check beside Ray's start (a server that does not answer is refused before it:
    tests/test_infrastructure.py): an S3 bucket that does not exist ends the sweep in one line,
    exit 1, before any table is generated or read and any run or sweep record is made."""
    location = "s3://no-such-bucket/sweeps"
    res = run_cli("tune", "--set", f"mlflow.artifact_location={location}", "--set",
                  f"mlflow.s3_endpoint_url={s3_endpoint}", "--set", "tune.name=never", cwd=tmp_path, attach=True,
                  env=S3_KEYS, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: artifact store {location}: no such bucket (S3 404 on bucket 'no-such-bucket')")
    assert "data: generating" not in res.stderr
    ws = tmp_path / ".churn"
    assert not (ws / "data").exists()
    assert not list(ws.glob("ray_results/never*"))
    cfg = make_config(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.unit
def test_the_store_check_beside_rays_start_is_done_again_after_an_import_deadlock(monkeypatch):
    """CPython 3.11 refuses an import two threads' module locks would deadlock on (importlib's
    _DeadlockError, a RuntimeError): the check beside Ray's start is then done again, once; any
    other error is the check's own."""
    from importlib._bootstrap import _DeadlockError

    from churnlib.tune import command

    calls = []

    def flaky(cfg):
        calls.append(cfg)
        if len(calls) == 1:
            raise _DeadlockError("deadlock detected by _ModuleLock('x')")

    monkeypatch.setattr(command.tracking, "preflight", flaky)
    command._preflight("cfg")
    assert calls == ["cfg", "cfg"]

    def broken(cfg):
        raise RuntimeError("the store said no")

    monkeypatch.setattr(command.tracking, "preflight", broken)
    with pytest.raises(RuntimeError, match="the store said no"):
        command._preflight("cfg")
