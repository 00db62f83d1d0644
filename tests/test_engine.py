"""The one-task engine (``churnlib.train.task``): which tables it takes, its checkpoints, and the
same training as XGBoost's own on the same rows. Unit tier: no Ray instance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from churnlib.data.features import FeatureSpec
from churnlib.data.generation import iter_chunks
from churnlib.data.preparation import Prepared, encode_batch
from churnlib.train.checkpoints import checkpoints_in, latest_in, read_checkpoint, write_checkpoint
from churnlib.train.loop import MODEL_FILE, STATE_FILE, new_state
from churnlib.train.task import boost_here, output_of, task_table, threads, uses_task
from churnlib.train.trainer import loop_config
from tests.conftest import make_config

pytestmark = pytest.mark.unit


def _prepared(local: bool) -> Prepared:
    arrays = {"X": np.zeros((4, 2), dtype=np.float32), "y": np.zeros(4), "flags": np.zeros(4), "is_valid": np.zeros(4),
              "ids": np.arange(4)}
    return Prepared(dataset="dataset", report=None, train_rows=3, valid_rows=1, local=arrays if local else None)


@pytest.mark.parametrize(("engine", "local", "gpu", "expected"), [
    ("auto", True, False, True),     # a small table read in the driver: one task
    ("auto", False, False, False),   # a large (or streamed) table: Ray Train's workers
    ("auto", True, True, False),     # GPUs asked for: Ray Train (one GPU a worker)
    ("task", False, False, True),
    ("task", True, True, True),
    ("ray_train", True, False, False),
    ("process", True, False, True),  # a Tune trial: in its own process, as for the task
])
def test_the_engine_rule(engine, local, gpu, expected):
    cfg = make_config(Path("."), training__engine=engine, ray__use_gpu=gpu)
    assert uses_task(cfg, _prepared(local)) is expected


@pytest.mark.parametrize(("engine", "size_mb", "gpu", "ray_up", "expected"), [
    ("auto", 10, False, False, True),     # a small table, no Ray up: this process, no instance to start
    ("auto", 10, False, True, False),     # an instance to join (churn up, a cluster): its one task
    ("auto", 100, False, False, False),   # too large to read here: Ray
    ("auto", 10, True, False, False),     # a GPU asked for: Ray's accounting of it
    ("process", 10, True, True, True),    # asked for: here, whatever is up
    ("task", 10, False, False, False),
    ("ray_train", 10, False, False, False),
])
def test_the_rule_for_boosting_in_this_process(engine, size_mb, gpu, ray_up, expected):
    from churnlib.train.task import boosts_here

    cfg = make_config(Path("."), training__engine=engine, ray__use_gpu=gpu)
    assert boosts_here(cfg, size_mb * 2**20, ray_up) is expected
    # a streamed table is never read whole here
    assert boosts_here(make_config(Path("."), training__materialize=False), 2**20, False) is False


def test_the_process_engine_refuses_a_table_too_large_in_one_line():
    from churnlib.errors import ResourceError
    from churnlib.train.task import boosts_here

    with pytest.raises(ResourceError, match=r"^training.engine=process boosts in this process and takes a table of "
                                            r"at most 64 MB on disk.*this one is 100 MB") as info:
        boosts_here(make_config(Path("."), training__engine="process"), 100 * 2**20, False)
    assert "\n" not in str(info.value)


def test_a_ray_instance_to_join_is_found_without_importing_ray(tmp_path, monkeypatch):
    """RAY_ADDRESS or ray.address (a cluster, a job), else the workspace's `churn up` record; `local`
    (a private instance, always) is none to join; a record of an instance that is gone is none."""
    import subprocess
    import sys

    from churnlib.runtime import Instance, ray_to_join, record_path

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # this test process may hold the session's instance
    cfg = make_config(tmp_path)
    assert ray_to_join(cfg.ray, tmp_path) is False
    assert ray_to_join(make_config(tmp_path, ray__address="10.0.0.5:6379").ray, tmp_path) is True
    assert ray_to_join(make_config(tmp_path, ray__address="local").ray, tmp_path) is False
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_to_join(cfg.ray, tmp_path) is True
    assert ray_to_join(make_config(tmp_path, ray__address="local").ray, tmp_path) is False
    monkeypatch.delenv("RAY_ADDRESS")
    rec = record_path(tmp_path)
    rec.parent.mkdir(parents=True, exist_ok=True)
    rec.write_text(json.dumps(Instance(pid=2**22 + 7, create_time=1.0, address="127.0.0.1:1", dashboard_url="x",
                                       metrics_url="y", num_cpus=1.0, num_gpus=0.0, started_at=1.0,
                                       log="z").to_dict()))
    assert ray_to_join(cfg.ray, tmp_path) is False and not rec.exists()  # gone: the record is removed
    script = ("import sys; from pathlib import Path; from churnlib.runtime import ray_to_join; "
              "from churnlib.config import load_config; "
              f"print(ray_to_join(load_config().ray, Path({str(tmp_path)!r})), 'ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_a_cluster_of_nodes_smaller_than_the_request_spreads_ray_train_workers_instead():
    from churnlib.errors import ResourceError
    from churnlib.train.task import check_fits

    cfg = make_config(Path("."), ray__num_workers=3, ray__cpus_per_worker=1)
    assert uses_task(cfg, _prepared(True), node_cpus=4) is True
    assert uses_task(cfg, _prepared(True), node_cpus=2) is False  # auto: no node holds 3 CPUs
    check_fits(cfg, 3)
    with pytest.raises(ResourceError, match="training.engine=task runs on one node and asks for 3 CPUs"):
        check_fits(make_config(Path("."), training__engine="task", ray__num_workers=3), 2)


def test_the_task_gets_every_cpu_asked_for_and_only_the_arrays_it_reads():
    assert threads(make_config(Path("."), ray__num_workers=2, ray__cpus_per_worker=1)) == 2
    assert threads(make_config(Path("."), ray__num_workers=3, ray__cpus_per_worker=0.5)) == 2
    assert threads(make_config(Path("."), ray__num_workers=1, ray__cpus_per_worker=0.5)) == 1
    assert sorted(task_table(_prepared(True))) == ["X", "flags", "is_valid", "y"]
    assert task_table(_prepared(False)) == "dataset"


def test_an_unknown_engine_is_refused_naming_the_key():
    from churnlib.errors import ConfigError

    with pytest.raises(ConfigError, match="training.engine"):
        make_config(Path("."), training__engine="spark")


def _booster(rounds: int = 3) -> xgb.Booster:
    rng = np.random.default_rng(0)
    X, y = rng.random((200, 3)), rng.integers(0, 2, 200)
    return xgb.train({"objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(X, label=y), rounds)


def test_checkpoints_are_whole_when_found_newest_last_and_pruned(tmp_path):
    run = str(tmp_path / "run")
    assert latest_in(run) is None and checkpoints_in(run) == []
    state = {**new_state(), "best_iteration": 1}
    uris = [write_checkpoint(run, _booster(r), {**state, "rounds": r}, keep=2) for r in (1, 2, 3)]
    assert checkpoints_in(run) == uris[1:]  # the oldest beyond keep is gone
    assert latest_in(run) == uris[-1]
    booster, got = read_checkpoint(uris[-1])
    assert booster.num_boosted_rounds() == 3 and got["rounds"] == 3
    # a folder being written (hidden name) and one missing its state are never taken
    (tmp_path / "run" / ".writing-checkpoint_9999").mkdir()
    broken = tmp_path / "run" / "checkpoint_9999-99-99_99-99-99.999999"
    broken.mkdir()
    (broken / MODEL_FILE).write_bytes(b"x")
    assert latest_in(run) == uris[-1]
    assert sorted(os.listdir(uris[-1])) == sorted([MODEL_FILE, STATE_FILE])


def test_keep_none_keeps_every_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    for r in (1, 2, 3):
        write_checkpoint(run, _booster(r), new_state(), keep=None)
    assert len(checkpoints_in(run)) == 3


def _encoded(rows: int = 3000):
    cfg = make_config(Path("."), xgboost__num_boost_round=60, xgboost__early_stopping_rounds=8,
                      training__checkpoint_every=10, training__progress_interval_s=0.0)
    spec = FeatureSpec.from_config(cfg.features)
    raw = next(iter_chunks(rows, seed=4, chunk_rows=rows))
    enc = encode_batch(raw, spec, spec.feature_names + ["Churn"], cfg.model.validation_split, cfg.model.random_state)
    return cfg, spec, enc


def test_boosting_here_is_xgboosts_own_training_with_our_early_stopping_and_checkpoints(tmp_path):
    """The task's boosting on the driver's arrays = xgboost.train on the same rows with
    XGBoost's EarlyStopping: the same trees; a checkpoint every 10 rounds, history whole."""
    cfg, spec, enc = _encoded()
    config = loop_config(cfg, spec)
    config["params"] = {**config["params"], "nthread": 1}
    table = {k: enc[k] for k in ("X", "y", "flags", "is_valid")}
    run = str(tmp_path / "run")
    final = boost_here(config, table, run, keep=None)
    out = output_of(final)
    ok = enc["flags"] == 0
    tr, va = ok & ~enc["is_valid"].astype(bool), ok & enc["is_valid"].astype(bool)
    kw = dict(feature_names=spec.feature_names, feature_types=spec.feature_types, enable_categorical=True)
    dtrain = xgb.QuantileDMatrix(enc["X"][tr], label=enc["y"][tr], max_bin=config["params"]["max_bin"], **kw)
    dvalid = xgb.QuantileDMatrix(enc["X"][va], label=enc["y"][va], ref=dtrain, **kw)
    theirs = xgb.train(config["params"], dtrain, 60, evals=[(dtrain, "train"), (dvalid, "valid")], verbose_eval=False,
                       callbacks=[xgb.callback.EarlyStopping(rounds=8, metric_name="auc", maximize=True)])
    assert out.state["best_iteration"] == theirs.best_iteration
    assert out.full_rounds == theirs.num_boosted_rounds()
    assert out.booster.num_boosted_rounds() == theirs.best_iteration + 1
    X = enc["X"][va]
    np.testing.assert_allclose(out.booster.inplace_predict(X),
                               theirs[: theirs.best_iteration + 1].inplace_predict(X), atol=1e-6)
    n = out.full_rounds
    assert all(len(v) == n for v in out.state["history"].values())
    assert out.state["worker_rows"] == {"train": int(tr.sum()), "valid": int(va.sum())}
    # checkpoints at rounds 10, 20, ... and the final one, each loadable
    rounds = [json.loads(Path(c, STATE_FILE).read_text())["history"]["valid-auc"].__len__() for c in checkpoints_in(run)]
    assert rounds == [r for r in range(10, n, 10)] + [n]


def test_a_restart_carries_on_from_the_newest_checkpoint_and_counts_it(tmp_path):
    """What a task run again after its process died does: the newest checkpoint of its run is
    taken, the restart counted, and the model is the one a run resumed from it gets."""
    cfg, spec, enc = _encoded()
    config = loop_config(cfg, spec)
    config["params"] = {**config["params"], "nthread": 1}
    table = {k: enc[k] for k in ("X", "y", "flags", "is_valid")}
    whole = output_of(boost_here(config, table, str(tmp_path / "whole"), keep=None))
    first = checkpoints_in(str(tmp_path / "whole"))[0]  # 10 rounds in
    # a run whose process "died" after that checkpoint: its folder holds only it
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    os.system(f"cp -r '{first}' '{crashed}/'")
    again = output_of(boost_here(config, table, str(crashed), keep=None))
    assert again.state["restarts"] == 1 and again.state["resumed_from"] == [10]
    # the first 10 rounds are the checkpoint's, not trained again
    assert again.state["history"]["valid-auc"][:10] == whole.state["history"]["valid-auc"][:10]
    # training.resume_from an earlier run's checkpoint: not a restart, and the same model
    resumed = output_of(boost_here({**config, "resume_from": first}, table, str(tmp_path / "resumed"), keep=None))
    assert resumed.state["restarts"] == 0 and resumed.state["resumed_from"] == [10]
    assert (resumed.full_rounds, resumed.state["best_iteration"]) == (again.full_rounds, again.state["best_iteration"])
    assert again.state["history"]["valid-auc"] == pytest.approx(resumed.state["history"]["valid-auc"], abs=1e-9)
    X = enc["X"][:500]
    np.testing.assert_allclose(resumed.booster.inplace_predict(X), again.booster.inplace_predict(X), atol=1e-6)


def test_a_max_bin_other_than_xgboosts_default_trains(tmp_path):
    """xgboost.max_bin (tunable) reaches both matrices: the validation one, built with the
    training one as reference, failed XGBoost's check against its own default 256."""
    cfg, spec, enc = _encoded()
    config = loop_config(cfg, spec)
    config["params"] = {**config["params"], "nthread": 1, "max_bin": 16}
    table = {k: enc[k] for k in ("X", "y", "flags", "is_valid")}
    out = output_of(boost_here(config, table, str(tmp_path / "run"), keep=None))
    assert out.full_rounds > 0 and out.state["worker_rows"]["valid"] > 0


def test_trials_in_one_process_reuse_the_tables_matrices_and_train_the_same_model(tmp_path):
    """A sweep's trials run one after another in the same process on the same table: the second
    takes the first's matrices (no pass over the table) and its model is the one fresh matrices
    give; other binning, or another table, builds its own."""
    from churnlib.train.task import matrices_of

    cfg, spec, enc = _encoded()
    config = loop_config(cfg, spec)
    config["params"] = {**config["params"], "nthread": 1}
    table = {k: enc[k] for k in ("X", "y", "flags", "is_valid")}
    first = matrices_of(table, config, "sweep-a")
    again = matrices_of(table, config, "sweep-a")
    assert again[0] is first[0] and again[1] is first[1]
    assert matrices_of(table, config, None)[0] is not first[0]  # no key: never shared
    other = matrices_of(table, config, "sweep-b")
    assert other[0] is not first[0]  # another table
    coarse = {**config, "params": {**config["params"], "max_bin": 16}}
    assert matrices_of(table, coarse, "sweep-b")[0] is not other[0]  # other binning

    shared = output_of(boost_here(config, table, str(tmp_path / "a"), keep=None, table_key="sweep-c"))
    reused = output_of(boost_here(config, table, str(tmp_path / "b"), keep=None, table_key="sweep-c"))
    fresh = output_of(boost_here(config, table, str(tmp_path / "c"), keep=None))
    assert reused.state["history"] == fresh.state["history"] == shared.state["history"]
    X = enc["X"][:500]
    np.testing.assert_allclose(reused.booster.inplace_predict(X), fresh.booster.inplace_predict(X), atol=1e-7)
