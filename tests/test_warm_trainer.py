"""`churn train` on `churn up`'s instance goes to the workspace trainer (churnlib.train.warm): a
warm process that boosts small tables, keeps its imports between commands, holds its CPUs on
the instance while it boosts, and stops, fails and dies the way a command's own process does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow import MlflowClient

from churnlib.data.generation import iter_chunks
from churnlib.train.warm import WorkspaceTrainer, code_fingerprint
from tests.conftest import SMALL, cli_env, make_config, run_cli, signal_cli

SETS = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
LONG = ["--set", "data.generate_rows=4000", "--set", "xgboost.num_boost_round=3000",
        "--set", "xgboost.early_stopping_rounds=0", "--set", "xgboost.eta=0.01",
        "--set", "training.checkpoint_every=5", "--set", "training.progress_interval_s=0.2"]

# attaches to the workspace instance and holds both of its CPUs until a line arrives on stdin
HOLD = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=2)
class Hold:
    def ping(self):
        return 1
h = Hold.remote()
ray.get(h.ping.remote())
print("holding", flush=True)
sys.stdin.readline()
"""


def _runs(tmp_path: Path) -> list:
    cfg = make_config(tmp_path)
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def _train(tmp_path: Path, env: dict, *extra: str) -> dict:
    res = run_cli("train", *SETS, *extra, "--json", cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    out["stderr"] = res.stderr
    return out


def test_the_workspace_trainer_is_warm_right_and_stops_like_a_command(tmp_path):
    env = cli_env()
    env.pop("RAY_AUTH_MODE", None)  # as in a fresh terminal
    # the command's folder is a git checkout: its commit is the run's (the trainer runs in that folder)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    up = run_cli("up", "--num-cpus", "2", "--json", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    inst = json.loads(up.stdout)
    try:
        assert inst["trainer"] == "started"
        # the first and the second command: the same trainer process, warm the second time, the
        # same model as the command's own process gives (engine=process boosts in the command)
        first = _train(tmp_path, env)
        assert first["engine"] == "process" and "train: in the workspace trainer" in first["stderr"]
        # XGBoost keeps to OMP_NUM_THREADS whatever its nthread: Ray's 1 for a 0-CPU actor would
        # halve the trainer's speed on 2 cores
        assert psutil.Process(first["trainer"]["pid"]).environ()["OMP_NUM_THREADS"] == str(os.cpu_count())
        second = _train(tmp_path, env)
        assert second["trainer"]["pid"] == first["trainer"]["pid"] and second["trainer"]["warm"]
        # every run boosts in one thread of the trainer: a run on another of the actor's threads
        # would start another OpenMP pool, and libgomp, with more threads than CPUs, sleeps at its
        # barriers (33-35 ms a round instead of 29 on 2 cores)
        assert second["trainer"]["thread"] == first["trainer"]["thread"]
        own = _train(tmp_path, env, "--set", "training.engine=process")
        assert "trainer" not in own and "train: in this process" in own["stderr"]
        for key in ("best_valid_auc", "best_valid_logloss", "best_iteration", "decision_contact_threshold"):
            assert first["metrics"][key] == second["metrics"][key] == own["metrics"][key], key
        runs = {r.info.run_id: r for r in _runs(tmp_path)}
        for out in (first, second):
            run = runs[out["run_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["churn.train_engine"] == "process"
            assert run.data.params["xgboost.max_depth"] == str(SMALL["xgboost.max_depth"])
            assert run.data.tags["mlflow.source.git.commit"] == commit
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(make_config(tmp_path).tracking_uri)
        try:
            model = mlflow.pyfunc.load_model(first["model_uri"])
        finally:
            mlflow.set_tracking_uri(previous)
        record = next(iter_chunks(3, seed=4, chunk_rows=3)).drop(columns=["Churn", "CustomerID"])
        assert len(model.predict(record)) == 3

        # its CPUs are counted on the instance: with both held by another driver it waits, says
        # so, and runs once they are free
        holder = subprocess.Popen([sys.executable, "-c", HOLD, inst["address"]], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env={**env, "RAY_AUTH_MODE": inst["auth_mode"]})
        try:
            assert holder.stdout.readline().strip() == "holding"
            proc = subprocess.Popen([sys.executable, "-m", "churnlib", "train", *SETS, "--json"], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
            reader.start()
            deadline = time.monotonic() + 120
            while not any("waiting for 2 CPU(s) on the workspace instance" in line for line in lines):
                assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
                time.sleep(0.1)
            time.sleep(1.0)
            assert proc.poll() is None and not any(line.startswith("  round") for line in lines)  # still waiting
            holder.communicate("go\n", timeout=60)
            stdout, _ = proc.communicate(timeout=300)
            reader.join(timeout=10)
            assert proc.returncode == 0, "".join(lines)[-3000:]
            assert json.loads(stdout)["metrics"]["best_valid_auc"] == first["metrics"]["best_valid_auc"]
        finally:
            for p in (holder,):
                if p.poll() is None:
                    p.kill()

        # Ctrl-C (the terminal's SIGINT to the group): 130, the run KILLED, the resume hint names a
        # real checkpoint, and the trainer stays for the next command
        rc, err, took, _ = signal_cli(["train", *LONG], "checkpoint at round", signal.SIGINT, True, tmp_path, env=env)
        lines = err.strip().splitlines()
        assert rc == 130 and lines[-1] == "error: interrupted" and "Traceback" not in err, err[-3000:]
        hint = [line for line in lines if "churn train --resume-from" in line]
        assert hint and Path(hint[0].rsplit(" ", 1)[1], "train_state.json").is_file(), err[-3000:]
        assert took < 30
        latest = _runs(tmp_path)[0]
        assert latest.info.status == "KILLED" and latest.data.tags["error"] == "Interrupted: SIGINT"

        # a command killed outright (SIGKILL: no handler runs): the trainer notices between two
        # rounds and ends the run KILLED itself
        rc, err, _, _ = signal_cli(["train", *LONG], "checkpoint at round", signal.SIGKILL, False, tmp_path, env=env)
        assert rc == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while (latest := _runs(tmp_path)[0]).info.status == "RUNNING":
            assert time.monotonic() < deadline, "the run of a killed command is still RUNNING"
            time.sleep(0.5)
        assert latest.info.status == "KILLED" and latest.data.tags["error"] == "Interrupted: SIGTERM"

        # a bad table: one line, exit 2, its run FAILED with no model; then the trainer takes the next
        bad = tmp_path / "bad.csv"
        df = next(iter_chunks(300, seed=2, chunk_rows=300)).astype(object)
        df.loc[5, "Age"] = "forty"
        df.to_csv(bad, index=False)
        res = run_cli("train", "--data", str(bad), cwd=tmp_path, env=env, timeout=300)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Age" in last and "forty" in last and "Traceback" not in res.stderr, res.stderr
        latest = _runs(tmp_path)[0]
        assert latest.info.status == "FAILED" and "Age" in latest.data.tags["error"]
        after = _train(tmp_path, env)
        assert after["trainer"]["pid"] == first["trainer"]["pid"]

        # the trainer's process killed mid-run: the command says so in one line, exit 1, the run
        # FAILED; the next command starts a new trainer
        def kill_trainer(proc) -> None:
            psutil.Process(first["trainer"]["pid"]).kill()

        rc, err, _, _ = signal_cli(["train", *LONG], "checkpoint at round", 0, False, tmp_path, env=env,
                                   on_start=kill_trainer)
        last = err.strip().splitlines()[-1]
        assert rc == 1 and last.startswith("error: training failed: the workspace trainer's process died"), err[-3000:]
        latest = _runs(tmp_path)[0]
        assert latest.info.status == "FAILED" and "process died" in latest.data.tags["error"]
        fresh = _train(tmp_path, env)
        assert fresh["trainer"]["pid"] != first["trainer"]["pid"] and not fresh["trainer"]["warm"]
        assert fresh["metrics"]["best_valid_auc"] == first["metrics"]["best_valid_auc"]
    finally:
        run_cli("down", cwd=tmp_path, env=env)


@pytest.fixture(scope="module")
def trainer() -> WorkspaceTrainer:
    return WorkspaceTrainer(code_fingerprint())


def test_the_trainer_takes_one_run_at_a_time_and_only_of_its_own_code(trainer):
    assert trainer.claim("a", "other code", 1) == "stale"
    assert trainer.claim("a", trainer.code, 1) == "ok"
    assert trainer.claim("b", trainer.code, 1) == "busy"
    assert trainer.claim("c", "other code", 1) == "busy"  # not replaced under a run
    assert trainer.info()["busy"]
    trainer._busy = None  # what the end of run "a" does
    assert trainer.claim("b", trainer.code, 1) == "ok"


def test_the_code_fingerprint_follows_the_files(tmp_path, monkeypatch):
    import churnlib.train.warm as warm

    pkg = tmp_path / "churnlib" / "train"
    pkg.mkdir(parents=True)
    (tmp_path / "churnlib" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(warm, "__file__", str(pkg / "warm.py"))
    before = code_fingerprint()
    assert code_fingerprint() == before
    (tmp_path / "churnlib" / "a.py").write_text("x = 22\n")
    assert code_fingerprint() != before
