"""MLflow: where runs go, a run that is never left RUNNING, and what a training run logs.

Only the driver calls this module; Ray workers report through Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator

from churnlib.errors import ChurnError, TrackingError, telling_line
from churnlib.figures import log_figure, pyplot

if TYPE_CHECKING:
    from churnlib.config import Config


def metric_key(name: str) -> str:
    """XGBoost metric names -> MLflow-safe keys ('valid-error@0.5' -> 'valid_error_at_0.5')."""
    return name.replace("@", "_at_").replace("-", "_")


# MLflow groups a run's charts by the part of a metric's key before "/": the
# learning curves (train/, valid/), the best iteration's values (best/), row
# counts, missing values and stage timings each get a section of their own.
# The names the code and `--json` use stay the plain ones; only MLflow's keys
# are grouped. Runs logged by earlier versions used the plain names as keys
# (readers that look a metric up in a run go through ``run_metric``, which knows both).
_GROUP_EXACT = {
    "train_rows": "rows/train", "valid_rows": "rows/valid", "dropped_empty_rows": "rows/dropped_empty",
    "total_rows": "rows/total", "missing_values": "missing/total", "best_iteration": "best/iteration",
    "num_boosted_rounds": "training/num_boosted_rounds", "stopped_early": "training/stopped_early",
    "worker_restarts": "training/worker_restarts", "rounds": "training/rounds", "sweep_s": "time/sweep_s",
    # evaluation: the paired-bootstrap comparison with the baseline, the gate
    "auc_diff_ci_low": "diff/roc_auc_ci_low", "auc_diff_ci_high": "diff/roc_auc_ci_high",
    "log_loss_diff": "diff/log_loss_paired", "log_loss_diff_ci_low": "diff/log_loss_ci_low",
    "log_loss_diff_ci_high": "diff/log_loss_ci_high", "gate_passed": "gate/passed",
    "value_diff_per_customer": "diff/expected_value_per_customer_paired",
    "value_diff_ci_low": "diff/expected_value_per_customer_ci_low",
    "value_diff_ci_high": "diff/expected_value_per_customer_ci_high",
}
_GROUP_PREFIXES = (("best_", "best/"), ("train_", "train/"), ("valid_", "valid/"), ("time_", "time/"),
                   ("missing_", "missing/"), ("rows_", "rows/"), ("baseline_", "baseline/"), ("diff_", "diff/"),
                   ("confusion_", "confusion/"), ("shap_mean_abs_", "shap/mean_abs_"), ("drift_", "drift/"),
                   ("trials_", "trials/"), ("value_", "value/"), ("lift_at_", "lift/at_"), ("gain_at_", "gains/at_"),
                   ("decision_", "decision/"), ("calibration_", "calibration/"))


def grouped(name: str) -> str:
    """The MLflow key of a metric: its section before "/" ('best_valid_auc' -> 'best/valid_auc',
    'time_fit_s' -> 'time/fit_s', 'train_rows' -> 'rows/train'); a headline metric
    ('roc_auc', 'trials') keeps its name."""
    if name in _GROUP_EXACT:
        return _GROUP_EXACT[name]
    for prefix, section in _GROUP_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return section + name[len(prefix):]
    return name


def history_key(xgb_name: str) -> str:
    """A learning curve's MLflow key from XGBoost's eval-log name ('valid-error@0.5' -> 'valid/error_at_0.5')."""
    split, _, metric = xgb_name.partition("-")
    return f"{split}/{metric.replace('@', '_at_')}" if metric else metric_key(xgb_name)


def run_metric(metrics: dict[str, float], name: str) -> float | None:
    """A metric of a logged run by its plain name, under its grouped key or (runs logged
    before the keys were grouped) its plain one."""
    value = metrics.get(grouped(name))
    return metrics.get(name) if value is None else value


def configure(cfg: Config) -> None:
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


_DB_SCHEMES = ("postgresql", "mysql", "mssql")


def redact(uri: str) -> str:
    """A URI without its password (postgresql://user:secret@host/db -> postgresql://user:***@host/db)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)


# How long `check_reachable` waits for a tracking server's first API answer.
API_PROBE_TIMEOUT_S = 30


def check_reachable(cfg: Config, api: bool = True) -> None:
    """Fail fast, in one line, when the tracking store cannot be reached.

    An HTTP server must answer its health check, and (``api``) its API a first
    request; a database store (MLflow can track straight into PostgreSQL) must
    accept a connection.
    """
    uri = cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException:
            raise TrackingError(f"MLflow tracking server unreachable at {uri}") from None
        if not api:
            return
        # Up is not enough: its API needs its database. One request, no retries, a
        # bounded wait (the client's own retries would take minutes to say the same). The
        # bound is generous: a server's first API request opens its store, which took over
        # 10 s on a loaded 2-core machine right after the server started.
        from mlflow.tracking._tracking_service.utils import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                                    max_retries=0, timeout=API_PROBE_TIMEOUT_S, raise_on_status=False, json={"max_results": 1})
            failed = f"HTTP {response.status_code}" if response.status_code >= 500 else None
        except Exception as exc:  # noqa: BLE001 - timeouts and connection errors alike
            failed = f"no answer within {API_PROBE_TIMEOUT_S} s" if "timeout" in str(exc).lower() else telling_line(exc)
        if failed:
            raise TrackingError(
                f"MLflow tracking server at {uri} is up but its API fails ({failed}): its backend store "
                f"(database) is likely down or unreachable; see the server's log"
            )
    elif uri.split(":", 1)[0].split("+", 1)[0] in _DB_SCHEMES:
        # One connection attempt with a short timeout: MLflow's own engine set-up
        # retries with back-off for over a minute before it gives up.
        import sqlalchemy

        connect_args = {"connect_timeout": 5} if uri.startswith("postgresql") else {}
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors of every kind
            raise TrackingError(f"MLflow backend store unreachable at {redact(uri)}: {telling_line(exc)}") from None


def _server_message(exc: BaseException) -> str:
    """The message an MLflow server put in its error response, else the error's first line."""
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            return str(response.json().get("message") or "")[:300] or telling_line(exc)
        except ValueError:
            pass
    return telling_line(exc)


def check_artifact_store(cfg: Config, experiment_id: str) -> None:
    """Fail fast, in one line, when the experiment's artifact store cannot be written.

    Direct S3 (``s3://`` artifact location): the bucket must exist and the
    credentials must be good (``head_bucket``). Proxied (``mlflow-artifacts:``):
    the tracking server lists the location, which makes it reach its own
    artifact store. A local folder needs no check.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    location = mlflow.get_experiment(experiment_id).artifact_location or ""
    if location.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket = location[len("s3://"):].split("/", 1)[0]
        endpoint = cfg.mlflow.s3_endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
        try:
            boto3.client("s3", endpoint_url=endpoint).head_bucket(Bucket=bucket)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = err.get("Code", "?")
            reason = {"404": "no such bucket", "NoSuchBucket": "no such bucket", "403": "access denied (check the credentials)"}
            raise TrackingError(
                f"artifact store {location}: {reason.get(code, err.get('Message') or code)} (S3 {code} on bucket {bucket!r})"
            ) from None
        except BotoCoreError as exc:
            raise TrackingError(f"artifact store {location}: {telling_line(exc)}") from None
    elif location.startswith("mlflow-artifacts:"):
        import requests

        try:
            mlflow.artifacts.list_artifacts(artifact_uri=location)
        except (MlflowException, requests.RequestException) as exc:
            raise TrackingError(
                f"artifact store behind the MLflow server at {cfg.tracking_uri} ({location}) failed: {_server_message(exc)}"
            ) from None


def probe(cfg: Config) -> None:
    """The quick part of ``preflight``, which imports no MLflow: a tracking server that does not
    answer, a database store that refuses a connection. For a command that runs the rest of
    ``preflight`` beside its own slow start (``churn tune``, beside Ray's)."""
    check_reachable(cfg, api=False)


def preflight(cfg: Config) -> str:
    """Before any slow work: the store answers, the experiment exists, its artifact store takes writes.

    -> the experiment id. Commands that write runs (train, evaluate, tune) call this first.
    """
    connect(cfg)
    experiment_id = ensure_experiment(cfg)
    check_artifact_store(cfg, experiment_id)
    return experiment_id


# What kind of experiment this is, in MLflow 3's own vocabulary (a model-training
# one, not GenAI). MLflow 3.17 and 3.18's UI still open every experiment on its GenAI
# overview (its switch is the browser's): the README and `churn quickstart` link
# the runs table (#/experiments/<id>/runs) instead.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(cfg: Config) -> str:
    """The configured experiment's id, created when missing (its artifact location checked)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = cfg.mlflow.experiment_name
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            try:
                return mlflow.create_experiment(name, artifact_location=cfg.artifact_location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:
                # created by a concurrent process in the meantime
                exp = mlflow.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # made before the kind was set, or by hand
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {redact(cfg.tracking_uri)}: {telling_line(exc)}") from None


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """The commit of the git checkout at ``path``, if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def connect(cfg: Config) -> None:
    """Point MLflow at the configured store and fail fast when its server is down.

    Commands call this first, before starting anything slow (Ray)."""
    configure(cfg)
    check_reachable(cfg)


@contextlib.contextmanager
def tracked_run(cfg: Config, run_name: str | None, tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[Any]:
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


def log_params_flat(params: dict[str, Any], run_id: str | None = None) -> None:
    """Params as MLflow strings (JSON for structures): into the active run, or into ``run_id``."""
    import mlflow

    clean = {}
    for key, value in params.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        clean[key] = "" if value is None else str(value)[:6000]
    if run_id is None:
        mlflow.log_params(clean)
        return
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in clean.items()]
    client = mlflow.MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100], synchronous=True)


def log_history(run_id: str, history: dict[str, list[float]]) -> None:
    """Per-iteration metrics as MLflow metric history (step = boosting iteration)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(history_key(name), float(v), now, step)
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
    """Feature importance by gain, weight and cover, one panel each."""
    plt = pyplot()

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
    import mlflow

    table = importance_table(booster, feature_names)
    mlflow.log_dict(table, "feature_importance.json")
    fig = importance_figure(table)
    log_figure(fig, "feature_importance.png")


def lineage_tags() -> dict[str, str]:
    """What ``mlflow.start_run`` records of where a run comes from (source, user, git commit),
    for the runs made through the client (a sweep's runs: the parent must stay RUNNING)."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = dict(resolve_tags({}))
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def log_dataset(source: Any, spec: Any, context: str, run_id: str | None = None) -> Any:
    """Record the data's source and digest as an MLflow dataset input (of the active run, or of
    ``run_id``); returns the dataset (metrics logged with it say which data they were measured on)."""
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
    if run_id is None:
        mlflow.log_input(dataset, context=context)
        return dataset
    from mlflow.entities import DatasetInput, InputTag

    mlflow.MlflowClient().log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
    return dataset


def log_model_metrics(metrics: dict[str, float], model_uri: str, dataset: Any = None) -> None:
    """``metrics`` (grouped keys) on the logged model ``models:/m-...`` too, with the dataset they
    were measured on: the MLflow models table then compares models by them. Into the active run."""
    import mlflow

    model_id = model_uri.rsplit("/", 1)[-1]
    if not model_id.startswith("m-"):
        return  # not a logged model (an older run's artifact path): the run holds the metrics
    clean = {k: float(v) for k, v in metrics.items() if v == v}
    if clean:
        mlflow.log_metrics(clean, model_id=model_id, dataset=dataset)


def metric_name(text: str) -> str:
    """``text`` as a valid MLflow metric name (other characters become ``_``)."""
    return re.sub(r"[^0-9A-Za-z_.\-/]", "_", text)
