"""Shared fixtures: one real local Ray instance per session, a fresh workspace per test.

Nothing is mocked: training runs on Ray Train workers, runs land in a real
MLflow store (SQLite + files in the test's workspace).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
KAGGLE_TEST = SHARED / "kaggle_customer_churn" / "customer_churn_dataset-testing-master.csv"
KAGGLE_TRAIN_PARTIAL = SHARED / "kaggle_customer_churn_train_partial" / "customer_churn_dataset-training-master.csv"
TELCO = SHARED / "telco_customer_churn" / "WA_Fn-UseC_-Telco-Customer-Churn.csv"

# Small but real: a few thousand rows, a few dozen rounds.
SMALL = {
    "data.generate_rows": 4000,
    "xgboost.num_boost_round": 40,
    "xgboost.early_stopping_rounds": 10,
    "xgboost.max_depth": 4,
    "training.checkpoint_every": 10,
    "training.progress_interval_s": 0.5,
}

# Variables that would point the library somewhere else than the test's workspace.
_LEAKY_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS", "CHURN_WORKSPACE")


def pytest_configure(config: Any) -> None:
    for var in _LEAKY_ENV:
        os.environ.pop(var, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_shared(path: Path) -> Path:
    """The real datasets in ../shared; in CI (CI=true) their absence is a failure, not a skip."""
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"shared dataset missing in CI: {path}")
        pytest.skip(f"shared dataset not present: {path}")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session, started the way `churn` starts it."""
    import ray

    from churnlib.config import load_config
    from churnlib.runtime import ensure_ray

    ensure_ray(load_config(env={}).ray)
    yield ray
    ray.shutdown()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_config(workspace: Path, files: list | None = None, **overrides: Any):
    from churnlib.config import load_config

    values = {"workspace": str(workspace / ".churn"), **SMALL}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(files, overrides=values, env={})


@pytest.fixture
def cfg_factory(workspace: Path):
    def factory(files: list | None = None, **overrides: Any):
        return make_config(workspace, files, **overrides)

    return factory


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m churnlib ...` in a subprocess (the real CLI, exit codes and streams)."""
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "churnlib", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_local_model(cfg, data_path, rounds: int = 40, run_name: str = "local-model", **params: Any) -> str:
    """Train a booster in this process on ``data_path`` and log it as `churn train` logs its model.

    The model (pyfunc on raw records, booster, feature spec, signature) is the
    real artifact format: ``churnlib.training._log_model`` writes it. Only the
    fitting skips Ray Train, which test_training covers, so a test can make
    several models of known quality in seconds. Returns the run id.
    """
    import pandas as pd
    import xgboost as xgb

    from churnlib import tracking
    from churnlib.data import check_columns, encode_batch, resolve_source
    from churnlib.features import FeatureSpec
    from churnlib.training import _log_model

    spec = FeatureSpec.from_config(cfg.features)
    source = resolve_source(str(data_path))
    columns = check_columns(source, spec)
    raw = pd.read_parquet(data_path) if str(data_path).endswith(".parquet") else pd.read_csv(data_path)
    enc = encode_batch(raw, spec, columns, cfg.model.validation_split, cfg.model.random_state)
    ok = enc["flags"] == 0
    dtrain = xgb.DMatrix(enc["X"][ok], label=enc["y"][ok], feature_names=spec.feature_names,
                         feature_types=spec.feature_types, enable_categorical=True)
    booster = xgb.train({**cfg.xgb_params(), "nthread": 1, **params}, dtrain, rounds)
    tracking.connect(cfg)
    tags = {"churn.command": "train", "data.digest": source.digest, "data.source": source.uri}
    with tracking.tracked_run(cfg, run_name, tags) as run:
        _log_model(cfg, spec, source, columns, booster, rounds - 1, run.info.run_id)
    return run.info.run_id


def no_running_runs(cfg) -> bool:
    """True when the store holds no run left RUNNING (every path ends its run)."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'", output_format="list")
    return not runs
