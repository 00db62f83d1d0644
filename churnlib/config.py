"""Configuration: the packaged YAML default, a user's file, environment, ``--set``.

``load_config`` merges them in that order and validates the result into typed
objects. Every problem (unknown key, bad type, impossible value) is a
``ConfigError`` whose one-line message names the key.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from churnlib.errors import ConfigError

# Metrics the evaluator computes; a gate on any other name is a config error.
EVAL_METRICS_HIGHER_IS_BETTER = (
    "roc_auc", "pr_auc", "accuracy", "precision", "recall", "f1",
    # the retention decision (churnlib.decision): ranking quality and money
    "top_decile_lift", "lift_at_5pct", "lift_at_10pct", "lift_at_20pct",
    "gain_at_5pct", "gain_at_10pct", "gain_at_20pct",
    "expected_value_per_customer", "expected_value_total", "precision_at_capacity", "recall_at_capacity",
)
EVAL_METRICS_LOWER_IS_BETTER = ("log_loss", "brier_score", "ece")
EVAL_METRICS = EVAL_METRICS_HIGHER_IS_BETTER + EVAL_METRICS_LOWER_IS_BETTER

XGB_EVAL_METRICS = ("auc", "aucpr", "logloss", "error", "map")
# Of those, the ones early stopping should maximise.
XGB_MAXIMIZE = ("auc", "aucpr", "map")

# Environment variable -> config key. Applied after the files, before --set.
ENV_OVERRIDES = {
    "MLFLOW_TRACKING_URI": "mlflow.tracking_uri",
    "MLFLOW_REGISTRY_URI": "mlflow.registry_uri",
    "MLFLOW_EXPERIMENT_NAME": "mlflow.experiment_name",
    "MLFLOW_S3_ENDPOINT_URL": "mlflow.s3_endpoint_url",
    "RAY_ADDRESS": "ray.address",
    "CHURN_WORKSPACE": "workspace",
    "CHURN_LOG_URI": "monitoring.log_uri",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MlflowConfig(_Section):
    """Where runs and models are tracked: tracking/registry URIs, experiment, run tags."""
    tracking_uri: str | None = None
    registry_uri: str | None = None
    experiment_name: str = Field(min_length=1)
    artifact_location: str | None = None
    s3_endpoint_url: str | None = None
    tags: dict[str, str] = {}


class ModelConfig(_Section):
    """The registered model's name, the decision threshold and the validation split."""
    name: str = Field(min_length=1)
    registered_name: str = Field(min_length=1)
    validation_split: float = Field(gt=0.0, lt=1.0)
    random_state: int = Field(ge=0)
    decision_threshold: float = Field(gt=0.0, lt=1.0)
    calibration: Literal["platt", "isotonic", "none"]


class XGBoostConfig(_Section):
    """XGBoost's training parameters (objective, rounds, depth, learning rate, ...)."""
    booster: Literal["gbtree", "dart"]
    device: Literal["auto", "cpu", "cuda"]
    tree_method: Literal["hist", "approx"]
    max_depth: int = Field(ge=0, le=64)
    eta: float = Field(gt=0.0, le=1.0)
    objective: Literal["binary:logistic"]
    eval_metric: list[str] = Field(min_length=1)
    num_boost_round: int = Field(ge=1)
    early_stopping_rounds: int = Field(ge=0)
    early_stopping_metric: str
    subsample: float = Field(gt=0.0, le=1.0)
    colsample_bytree: float = Field(gt=0.0, le=1.0)
    min_child_weight: float = Field(ge=0.0)
    gamma: float = Field(ge=0.0)
    reg_alpha: float = Field(ge=0.0)
    reg_lambda: float = Field(ge=0.0)
    max_bin: int = Field(ge=2)
    seed: int = Field(ge=0)
    nthread: int | None = Field(default=None, ge=1)

    @field_validator("eval_metric")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        for metric in value:
            base = metric.split("@", 1)[0]
            if base not in XGB_EVAL_METRICS:
                raise ValueError(f"unknown metric {metric!r} (known: {', '.join(XGB_EVAL_METRICS)}, error@t)")
            if "@" in metric:
                try:
                    float(metric.split("@", 1)[1])
                except ValueError:
                    raise ValueError(f"bad metric threshold in {metric!r}") from None
        if len(set(value)) != len(value):
            raise ValueError("metrics repeat")
        return value

    @model_validator(mode="after")
    def _stopping_metric_is_evaluated(self) -> "XGBoostConfig":
        if self.early_stopping_metric not in self.eval_metric:
            raise ValueError(
                f"early_stopping_metric {self.early_stopping_metric!r} is not in eval_metric {self.eval_metric}"
            )
        return self


class TrainingConfig(_Section):
    """Where the boosting runs; checkpoints, failures, resuming, streaming and progress of a training run."""
    engine: Literal["auto", "process", "task", "ray_train"] = "auto"
    checkpoint_every: int = Field(ge=0)
    max_failures: int = Field(ge=-1)
    keep_checkpoints: int | None = Field(default=2, ge=1)
    resume_from: str | None = None
    storage_path: str | None = None
    batch_size: int = Field(ge=1)
    materialize: bool
    progress_interval_s: float = Field(ge=0.0)


class DataConfig(_Section):
    """Where the training data is (or how much to generate) and the test table."""
    path: str | None = None
    generate_rows: int = Field(ge=10)
    generate_seed: int = Field(ge=0)


class RayConfig(_Section):
    """Which Ray cluster, how many workers, their CPUs and GPUs, how long to wait for them."""
    address: str | None = None
    num_workers: int = Field(ge=1)
    cpus_per_worker: float = Field(gt=0.0)
    use_gpu: bool
    controller_poll_interval_s: float = Field(gt=0.0, le=60.0)
    resources_timeout_s: float = Field(ge=0.0)


class ShapConfig(_Section):
    """How evaluation explains the model: algorithm, sample size, top customers."""
    enabled: bool
    explainer_type: Literal["tree", "exact", "tree_explainer"]
    max_samples: int = Field(ge=1)
    background_samples: int = Field(ge=1)
    top_customers: int = Field(ge=0)


class BootstrapConfig(_Section):
    """The paired bootstrap that compares a model with its baseline."""
    resamples: int = Field(ge=10)
    confidence: float = Field(gt=0.5, lt=1.0)
    max_rows: int = Field(ge=100)
    seed: int = Field(ge=0)


class EvaluationConfig(_Section):
    """Evaluation: thresholds (the gates), comparison, SHAP, calibration bins."""
    shap: ShapConfig
    thresholds: dict[str, float] = {}
    require_improvement: bool = False
    calibration_bins: int = Field(ge=2, le=1000)
    bootstrap: BootstrapConfig

    @field_validator("thresholds")
    @classmethod
    def _known_gate_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if name not in EVAL_METRICS:
                raise ValueError(f"no metric named {name!r} is computed (known: {', '.join(EVAL_METRICS)})")
        return value


class DecisionConfig(_Section):
    """The retention decision: what a saved churner is worth, what a contact costs, how many
    contacted churners stay, and at most how many customers a run may contact."""
    value_saved: float = Field(gt=0.0)
    contact_cost: float = Field(ge=0.0)
    save_rate: float = Field(gt=0.0, le=1.0)
    capacity: int | None = Field(default=None, ge=1)
    capacity_share: float | None = Field(default=None, gt=0.0, le=1.0)
    # whom to contact: "auto" (the cut worth most on the validation rows, chosen at training and
    # carried by the model) or a fixed P(churn)
    threshold: float | str = "auto"

    @field_validator("threshold", mode="before")
    @classmethod
    def _auto_or_probability(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"must be auto or a probability in (0, 1), got {value!r}")
        return float(value)

    @property
    def fixed_threshold(self) -> float | None:
        """The configured cut, or None for auto (the model's own)."""
        return None if self.threshold == "auto" else float(self.threshold)


class ScoringConfig(_Section):
    """How tables are scored: `churn predict`'s engine, the Ray Data actor pool (evaluate, predict)."""
    engine: Literal["auto", "task", "ray_data"] = "auto"
    batch_size: int = Field(ge=1)
    actors: int = Field(ge=1)
    cpus_per_actor: float = Field(gt=0.0)
    explain_top: int = Field(ge=1, le=20)
    drift: bool


class DriftConfig(_Section):
    """The training profile's size and the PSI thresholds of the drift verdicts."""
    profile_rows: int = Field(ge=100)
    psi_moderate: float = Field(gt=0.0)
    psi_major: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _order(self) -> "DriftConfig":
        if self.psi_major <= self.psi_moderate:
            raise ValueError(f"psi_major ({self.psi_major:g}) must be above psi_moderate ({self.psi_moderate:g})")
        return self


# XGBoost parameters a sweep may tune (fields of XGBoostConfig).
TUNABLE = ("eta", "max_depth", "subsample", "colsample_bytree", "min_child_weight", "gamma", "reg_alpha",
           "reg_lambda", "max_bin", "booster")


class DistributionConfig(_Section):
    """One tuned parameter: uniform / loguniform (floats), randint (ints, both bounds
    included) between low and high, or choice among values."""

    distribution: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "DistributionConfig":
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty list of values")
            if self.low is not None or self.high is not None:
                raise ValueError("choice takes values, not low/high")
            return self
        if self.values is not None:
            raise ValueError(f"{self.distribution} takes low and high, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.distribution} needs low and high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.distribution == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low:g})")
        if self.distribution == "randint" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("randint needs whole-number bounds")
        return self

    def candidates(self) -> list[Any]:
        """The values that bound what can be drawn (checked against XGBoost's own limits)."""
        if self.distribution == "choice":
            return list(self.values or [])
        cast = int if self.distribution == "randint" else float
        return [cast(self.low), cast(self.high)]


class TuneSettings(_Section):
    """A sweep: trials, search algorithm and space, ASHA, concurrency, its name."""
    num_samples: int = Field(ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    search: Literal["optuna", "random"]
    scheduler: Literal["asha", "none"]
    grace_period: int = Field(ge=1)
    reduction_factor: float = Field(gt=1.0)
    report_every: int = Field(ge=1)
    name: str | None = None
    seed: int = Field(ge=0)
    search_space: dict[str, DistributionConfig] = Field(min_length=1)

    @field_validator("search_space")
    @classmethod
    def _tunable(cls, value: dict[str, DistributionConfig]) -> dict[str, DistributionConfig]:
        from pydantic import TypeAdapter

        for key, dist in value.items():
            if key not in TUNABLE:
                raise ValueError(f"{key!r} cannot be tuned (tunable: {', '.join(TUNABLE)})")
            field = XGBoostConfig.model_fields[key]
            adapter = TypeAdapter(Annotated[field.annotation, field])  # type: ignore[name-defined]
            for candidate in dist.candidates():
                try:
                    adapter.validate_python(candidate)
                except ValidationError as exc:
                    msg = exc.errors()[0]["msg"]
                    raise ValueError(f"{key}: {candidate!r} is not a valid xgboost.{key}: {msg}") from None
        return value


class AlertsConfig(_Section):
    """`churn monitor`'s alert thresholds per model version and window (null: no such alert)."""
    drift_psi: float | None = Field(default=None, gt=0.0)  # a feature's PSI above this
    realized_roc_auc: float | None = Field(default=None, gt=0.0, le=1.0)  # below this
    estimated_roc_auc: float | None = Field(default=None, gt=0.0, le=1.0)  # below this
    min_volume: int | None = Field(default=None, ge=1)  # fewer predictions than this


class MonitoringConfig(_Section):
    """The prediction log (where every answer and batch run is recorded) and its writer."""
    log_uri: str | None = None
    log_serving: bool
    batch_rows: int = Field(ge=1)
    flush_interval_s: float = Field(gt=0.0)
    queue_max: int = Field(ge=1)
    retry_s: float = Field(gt=0.0)
    spool_dir: str | None = None
    outcome_column: str | None = None
    observed_at_column: str = Field(min_length=1)
    horizon_days: float = Field(gt=0.0)
    window: str = Field(min_length=2)
    live_window_rows: int = Field(ge=100)
    live_interval_s: float = Field(gt=0.0)
    alerts: AlertsConfig


class RolloutCriteriaConfig(_Section):
    """What `churn rollout promote` requires of the live evidence."""
    min_volume: int = Field(ge=0)
    min_outcomes: int = Field(ge=1)
    require_outcomes: bool
    metric: Literal["roc_auc", "top_decile_lift", "value_per_customer"]
    margin: float = Field(ge=0.0)
    bootstrap: int = Field(ge=100)


class RolloutConfig(_Section):
    """Champion and challenger on live traffic: the defaults of `churn rollout start`, Serve's shadow
    queue, the promotion criteria."""
    mode: Literal["shadow", "canary"]
    share: float = Field(gt=0.0, lt=1.0)
    shadow_queue: int = Field(ge=1)
    criteria: RolloutCriteriaConfig
    seed: int


class ServeConfig(_Section):
    """`churn serve`: host, port, replicas, batching, limits, the alias it follows."""
    import_path: str = Field(pattern=r"^[\w.]+:[\w]+$")
    alias: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    replicas: int = Field(ge=1)
    cpus_per_replica: float = Field(gt=0.0)
    gpus_per_replica: float = Field(ge=0.0)
    poll_interval_s: float = Field(gt=0.0)
    max_batch_size: int = Field(ge=1)
    batch_wait_timeout_s: float = Field(ge=0.0)
    max_ongoing_requests: int = Field(ge=1)
    max_records: int = Field(ge=1)
    max_explain_records: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1024)
    unknown_fields: Literal["reject", "ignore"]
    top_reasons: int = Field(ge=1)
    access_log: bool
    high_throughput: Literal["auto", "on", "off"]
    shutdown_grace_s: float = Field(ge=0.0)


class TargetConfig(_Section):
    """The target column and how its positive and negative values are spelled."""
    column: str = Field(min_length=1)
    positive: str | int | bool
    negative: str | int | bool

    @model_validator(mode="after")
    def _distinct(self) -> "TargetConfig":
        if str(self.positive).strip().lower() == str(self.negative).strip().lower():
            raise ValueError("positive and negative target values are the same")
        return self


class FeaturesConfig(_Section):
    """The id, numeric and categorical columns (with their levels) of the table."""
    id_column: str | None = None
    target: TargetConfig
    numeric: list[str] = []
    categorical: dict[str, list[str]] = {}
    # What each column means, with its unit: shown in the API docs (Swagger UI).
    descriptions: dict[str, str] = {}
    # One real customer in the raw schema: the example record of the API docs.
    example: dict[str, Any] | None = None

    @field_validator("categorical")
    @classmethod
    def _levels(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for column, levels in value.items():
            if not levels:
                raise ValueError(f"categorical feature {column!r} has no levels")
            if len(set(levels)) != len(levels):
                raise ValueError(f"categorical feature {column!r} repeats a level")
            if any(not str(level).strip() for level in levels):
                raise ValueError(f"categorical feature {column!r} has an empty level")
        return value

    @model_validator(mode="after")
    def _columns(self) -> "FeaturesConfig":
        names = list(self.numeric) + list(self.categorical)
        if not names:
            raise ValueError("no features: give numeric and/or categorical columns")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"column {name!r} is listed twice")
            seen.add(name)
        for special in (self.target.column, self.id_column):
            if special and special in seen:
                raise ValueError(f"column {special!r} is both a feature and the target/id column")
        if self.id_column and self.id_column == self.target.column:
            raise ValueError("id_column and target column are the same")
        known = set(names) | {c for c in (self.id_column, self.target.column) if c}
        unknown = sorted(set(self.descriptions) - known)
        if unknown:
            raise ValueError(f"descriptions: no column named {unknown[0]!r}")
        if self.example is not None:
            self._check_example(self.example, known)
        return self

    def _check_example(self, example: dict[str, Any], known: set[str]) -> None:
        """The example record must be one the service accepts: every feature, valid values."""
        for column in sorted(set(example) - known):
            raise ValueError(f"example: no column named {column!r}")
        for column in self.numeric:
            if column not in example:
                raise ValueError(f"example: feature {column!r} is missing")
            value = example[column]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"example: {column!r} must be a number, not {value!r}")
        for column, levels in self.categorical.items():
            if column not in example:
                raise ValueError(f"example: feature {column!r} is missing")
            if example[column] is not None and str(example[column]) not in {str(v) for v in levels}:
                raise ValueError(f"example: {column!r} is {example[column]!r}, not one of its levels")


class Config(_Section):
    """The whole configuration: every section, validated, with the workspace's paths."""
    workspace: str
    mlflow: MlflowConfig
    model: ModelConfig
    xgboost: XGBoostConfig
    training: TrainingConfig
    data: DataConfig
    ray: RayConfig
    scoring: ScoringConfig
    drift: DriftConfig
    evaluation: EvaluationConfig
    decision: DecisionConfig
    tune: TuneSettings
    serve: ServeConfig
    monitoring: MonitoringConfig
    rollout: RolloutConfig
    features: FeaturesConfig

    @model_validator(mode="after")
    def _device(self) -> "Config":
        if self.xgboost.device == "cuda" and not self.ray.use_gpu:
            raise ValueError("xgboost.device is cuda but ray.use_gpu is false: workers would get no GPU")
        if self.ray.use_gpu and self.xgboost.tree_method != "hist":
            raise ValueError("ray.use_gpu needs xgboost.tree_method hist")
        return self

    # Derived values -------------------------------------------------------

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.workspace_path / 'mlflow.db'}"

    @property
    def log_uri(self) -> str:
        """The prediction log's database: ``monitoring.log_uri``, else SQLite in the workspace."""
        return self.monitoring.log_uri or f"sqlite:///{self.workspace_path / 'prediction_log.db'}"

    @property
    def spool_path(self) -> Path:
        """Where writers spool batches while the log's database is down."""
        return Path(self.monitoring.spool_dir).expanduser().resolve() if self.monitoring.spool_dir else (
            self.workspace_path / "spool")

    @property
    def registry_uri(self) -> str:
        return self.mlflow.registry_uri or self.tracking_uri

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment's artifacts go: ``mlflow.artifact_location``; else, for a
        tracking server (http/https, databricks), the server's own store (None); else (the
        workspace's SQLite, or a database URI the user gives) the workspace's ``artifacts``
        folder, never MLflow's default ``./mlruns`` of whatever folder the command ran in."""
        if self.mlflow.artifact_location:
            return self.mlflow.artifact_location
        uri = self.mlflow.tracking_uri
        if uri is not None and uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc", "uc"):
            return None
        return (self.workspace_path / "artifacts").as_uri()

    @property
    def storage_path(self) -> str:
        return self.training.storage_path or str(self.workspace_path / "ray_results")

    @property
    def xgb_device(self) -> str:
        """The XGBoost device the workers use: cuda exactly when they get GPUs."""
        if self.xgboost.device == "auto":
            return "cuda" if self.ray.use_gpu else "cpu"
        return self.xgboost.device

    @property
    def xgb_nthread(self) -> int:
        return self.xgboost.nthread or max(1, int(self.ray.cpus_per_worker))

    def xgb_params(self) -> dict[str, Any]:
        """Parameters for ``xgboost.train`` (everything but rounds and early stopping)."""
        x = self.xgboost
        return {
            "booster": x.booster,
            "device": self.xgb_device,
            "tree_method": x.tree_method,
            "max_depth": x.max_depth,
            "eta": x.eta,
            "objective": x.objective,
            "eval_metric": list(x.eval_metric),
            "subsample": x.subsample,
            "colsample_bytree": x.colsample_bytree,
            "min_child_weight": x.min_child_weight,
            "gamma": x.gamma,
            "reg_alpha": x.reg_alpha,
            "reg_lambda": x.reg_lambda,
            "max_bin": x.max_bin,
            "seed": x.seed,
            "nthread": self.xgb_nthread,
        }

    def flat(self) -> dict[str, Any]:
        """Every resolved value under its dotted key (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix not in _LEAF_MAPPINGS:
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


# Mappings that are values in their own right (logged whole, not key by key).
_LEAF_MAPPINGS = {"features.categorical", "tune.search_space"}
# Mappings a user's file replaces whole instead of merging into: another
# table's categorical columns, or a smaller set of gates, must not inherit ours.
_REPLACED_MAPPINGS = {"categorical", "thresholds", "search_space", "descriptions", "example"}


def default_config_text() -> str:
    """The packaged default configuration file, as text."""
    return resources.files("churnlib").joinpath("default_config.yaml").read_text(encoding="utf-8")


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key not in _REPLACED_MAPPINGS:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# What describes one table's columns: a file that lists other columns (another
# table) starts without ours, unless it gives its own.
_TABLE_DOCS = ("descriptions", "example")


def _drop_other_tables_docs(tree: dict[str, Any], columns_given: bool, docs_given: set[str]) -> None:
    """When a file or ``--set`` lists other columns (another table), the default table's
    descriptions and example go, unless that same source gives its own."""
    features = tree.get("features")
    if columns_given and isinstance(features, dict):
        for doc in set(_TABLE_DOCS) - docs_given:
            features.pop(doc, None)


def _merge_file(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` (a config file) merged into ``base``; another table's columns drop ours' docs."""
    out = _deep_merge(base, over)
    features = over.get("features") if isinstance(over, Mapping) else None
    if isinstance(features, Mapping):
        _drop_other_tables_docs(out, bool({"numeric", "categorical"} & set(features)), set(_TABLE_DOCS) & set(features))
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{origin}: bad key {dotted!r}")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(parts[: i + 1])} is not a section, cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    return key, value


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections")
    return data


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"config: unknown key {loc}"
    if kind == "missing":
        return f"config: missing key {loc}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or kind == "value_error" else f" (got {got!r})"
    return f"config: {loc}: {msg}{shown}"


def load_config(
    config_files: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge default <- files <- environment <- overrides and validate.

    ``overrides`` is a list of ``key=value`` strings (as given to ``--set``) or a
    mapping of dotted keys to values.
    """
    tree = yaml.safe_load(default_config_text())
    if config_files is None:
        files: list[str | os.PathLike] = []
    elif isinstance(config_files, (str, os.PathLike)):
        files = [config_files]
    else:
        files = list(config_files)
    for path in files:
        tree = _merge_file(tree, _read_yaml(path))

    environ = os.environ if env is None else env
    for var, key in ENV_OVERRIDES.items():
        value = environ.get(var)
        if value:
            _set_dotted(tree, key, value, f"environment {var}")

    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else (parse_set(o) for o in overrides)
        touched = []
        for key, value in items:
            _set_dotted(tree, key, value, f"--set {key}")
            touched.append(key)
        whole = tree.get("features") if "features" in touched and isinstance(tree.get("features"), dict) else {}
        _drop_other_tables_docs(tree, bool({"features", "features.numeric", "features.categorical"} & set(touched)),
                                {d for d in _TABLE_DOCS if d in whole or any(k.startswith(f"features.{d}") for k in touched)})
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def config_to_yaml(cfg: Config) -> str:
    """``cfg`` as YAML (what `churn config` prints and runs log as an artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
