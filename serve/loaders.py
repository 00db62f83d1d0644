"""Where a replica's model comes from: injected into the deployment, so a test can hand it any loader.

- ``RegistryLoader``: production; the version behind an alias of the
  registered model (``models:/<name>@champion``), polled by the replica.
- ``UriLoader``: one fixed model URI (``runs:/<id>/model``,
  ``models:/<name>/<version>``) with nothing to follow: a pinned model, tests.

A loader has ``current()`` (the key of what should be served now: a version, or
the URI), ``load(key)`` (-> ``LoadedVersion``), ``describe()`` and
``follows_alias``. Loaders talk to MLflow from the replica, with short
timeouts, so a slow registry cannot stall a poll for minutes.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from churnlib.model import loading
from churnlib.rollout import state
from churnlib.tags import TAG_EVAL_PREFIX, TAG_EVAL_RUN, TAG_TRAIN_PREFIX

if TYPE_CHECKING:
    from churnlib.config import Config

_REPLICA_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass
class LoadedVersion:
    """A model ready to answer, with what ``/model`` reports about it."""

    predictor: Any  # churnlib.model.predictor.ChurnPredictor
    name: str
    version: str
    alias: str | None
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "metrics": self.metrics,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "decision_threshold": self.predictor.threshold,
            "features": self.predictor.spec.feature_names,
        }


def _configure_mlflow(tracking_uri: str, registry_uri: str) -> None:
    import mlflow

    for key, value in _REPLICA_MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)


class RegistryLoader:
    """Production: the version behind ``alias`` of the registered model ``name``."""

    follows_alias = True

    def __init__(self, tracking_uri: str, registry_uri: str, name: str, alias: str):
        self.tracking_uri, self.registry_uri, self.name, self.alias = tracking_uri, registry_uri, name, alias

    @classmethod
    def from_config(cls, cfg: Config, alias: str | None = None) -> "RegistryLoader":
        return cls(cfg.tracking_uri, cfg.registry_uri, cfg.model.registered_name, alias or cfg.serve.alias)

    def describe(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def current(self) -> str:
        """The version behind the alias now ("3"; "3:<digest>" once its decision was re-derived with
        `churn models decide`, so that a new decision is picked up like a new version);
        NoSuchAliasError when there is none yet."""
        _configure_mlflow(self.tracking_uri, self.registry_uri)
        ref = loading.resolve(self.describe())
        if ref.decision:
            return f"{ref.version}:{hashlib.sha256(ref.decision.encode()).hexdigest()[:12]}"
        return str(ref.version)

    def rollout(self) -> Any:
        """The rollout on the registered model (``churnlib.rollout.state.Rollout``), or None."""
        from mlflow import MlflowClient

        _configure_mlflow(self.tracking_uri, self.registry_uri)
        return state.read(MlflowClient(), self.name)

    def key_of(self, version: str) -> str:
        """``current()``'s key for a given version (a challenger's): its decision's digest included."""
        _configure_mlflow(self.tracking_uri, self.registry_uri)
        ref = loading.resolve(f"models:/{self.name}/{version}")
        if ref.decision:
            return f"{ref.version}:{hashlib.sha256(ref.decision.encode()).hexdigest()[:12]}"
        return str(ref.version)

    def load(self, key: str, alias: str | None = None) -> LoadedVersion:
        from mlflow import MlflowClient

        version = key.split(":")[0]
        _configure_mlflow(self.tracking_uri, self.registry_uri)
        loaded = loading.load(f"models:/{self.name}/{version}")
        tags = MlflowClient().get_model_version(self.name, version).tags or {}
        metrics = {}
        for key, value in tags.items():
            if key.startswith((TAG_TRAIN_PREFIX, TAG_EVAL_PREFIX)) and key != TAG_EVAL_RUN:
                try:
                    metrics[key] = float(value)
                except ValueError:
                    pass
        return LoadedVersion(loaded.predictor, self.name, str(version), alias or self.alias, loaded.ref.run_id,
                             metrics)


class UriLoader:
    """One fixed model URI (``runs:/<id>/model``, ``models:/<name>/<version>``): nothing to follow."""

    follows_alias = False

    def __init__(self, uri: str, tracking_uri: str, registry_uri: str | None = None):
        self.uri, self.tracking_uri, self.registry_uri = uri, tracking_uri, registry_uri or tracking_uri

    def describe(self) -> str:
        return self.uri

    def current(self) -> str:
        return self.uri

    def load(self, key: str) -> LoadedVersion:
        _configure_mlflow(self.tracking_uri, self.registry_uri)
        loaded = loading.load(key)
        ref = loaded.ref
        name = ref.name or loaded.predictor.meta.get("model_name", "churn")
        version = ref.version or (ref.run_id or key)[:12]
        return LoadedVersion(loaded.predictor, name, str(version), None, ref.run_id)
