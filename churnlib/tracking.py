"""MLflow: where runs go, a run that is never left RUNNING, and what a training run logs.

Only the driver calls this module; Ray workers report through Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import warnings
from typing import Any, Iterator

from churnlib.errors import ChurnError, TrackingError


def metric_key(name: str) -> str:
    """XGBoost metric names -> MLflow-safe keys ('valid-error@0.5' -> 'valid_error_at_0.5')."""
    return name.replace("@", "_at_").replace("-", "_")


def configure(cfg: Any) -> None:
    """Point the MLflow client at the configured store (called by commands, never at import)."""
    import mlflow

    if cfg.mlflow.tracking_uri is None:
        cfg.workspace_path.mkdir(parents=True, exist_ok=True)
    if cfg.mlflow.s3_endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = cfg.mlflow.s3_endpoint_url
    # A server that is down should be one clear line within seconds, not minutes
    # of retries with back-off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri)


def check_reachable(cfg: Any) -> None:
    """For an HTTP tracking server, fail fast with one line when it is unreachable."""
    uri = cfg.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException:
        raise TrackingError(f"MLflow tracking server unreachable at {uri}") from None


def ensure_experiment(cfg: Any) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = cfg.mlflow.experiment_name
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            try:
                return mlflow.create_experiment(name, artifact_location=cfg.artifact_location)
            except MlflowException:
                # created by a concurrent process in the meantime
                exp = mlflow.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return exp.experiment_id
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {cfg.tracking_uri}: {exc.message.splitlines()[0]}") from None


def git_commit(path: str | os.PathLike = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def connect(cfg: Any) -> None:
    """Point MLflow at the configured store and fail fast when its server is down.

    Commands call this first, before starting anything slow (Ray)."""
    configure(cfg)
    check_reachable(cfg)


@contextlib.contextmanager
def tracked_run(cfg: Any, run_name: str | None, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[Any]:
    """Start a run (after ``connect``); end it FINISHED, or FAILED (KILLED on Ctrl-C) with the error as a tag."""
    import mlflow

    experiment_id = ensure_experiment(cfg)
    all_tags = {**cfg.mlflow.tags, **(tags or {})}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags, nested=nested)
    try:
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            message = str(exc) if isinstance(exc, ChurnError) else f"{type(exc).__name__}: {exc}"
            mlflow.set_tag("error", message[:5000])
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_params_flat(params: dict[str, Any]) -> None:
    import mlflow

    clean = {}
    for key, value in params.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        clean[key] = "" if value is None else str(value)[:6000]
    mlflow.log_params(clean)


def log_history(run_id: str, history: dict[str, list[float]]) -> None:
    """Per-iteration metrics as MLflow metric history (step = boosting iteration)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(metric_key(name), float(v), now, step)
        for name, values in history.items()
        for step, v in enumerate(values)
    ]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)


def importance_table(booster: Any, feature_names: list[str]) -> dict[str, dict[str, float]]:
    """{importance_type: {feature: value}} with 0 for features no tree uses."""
    out = {}
    for kind in ("gain", "weight", "cover"):
        scores = booster.get_score(importance_type=kind)
        out[kind] = {f: float(scores.get(f, 0.0)) for f in feature_names}
    return out


def importance_figure(table: dict[str, dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(table)
    features = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 0.45 * len(features) + 1.5))
    for ax, kind in zip(axes, kinds):
        values = table[kind]
        order = sorted(features, key=lambda f: values[f])
        ax.barh(order, [values[f] for f in order], color="#4477aa")
        ax.set_title(f"importance: {kind}")
    fig.tight_layout()
    return fig


def log_importance(booster: Any, feature_names: list[str]) -> None:
    """Feature importance (gain, weight, cover) as feature_importance.json and .png in the active run."""
    import matplotlib.pyplot as plt
    import mlflow

    table = importance_table(booster, feature_names)
    mlflow.log_dict(table, "feature_importance.json")
    fig = importance_figure(table)
    mlflow.log_figure(fig, "feature_importance.png")
    plt.close(fig)


def log_dataset(source: Any, spec: Any, context: str) -> None:
    """Record the data's source and digest as an MLflow dataset input."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    schema = Schema(
        [ColSpec("double", c) for c in spec.numeric]
        + [ColSpec("string", c) for c in spec.categorical_columns]
        + [ColSpec("string", spec.target)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds_source = resolve_dataset_source(source.uri)
    dataset = MetaDataset(source=ds_source, name=source.name, digest=source.digest, schema=schema)
    mlflow.log_input(dataset, context=context)
