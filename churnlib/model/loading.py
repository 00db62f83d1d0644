"""Model URIs -> what they point at, and the model itself.

Any MLflow model URI works: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``,
``models:/<name>@<alias>`` and a logged model's ``models:/m-<id>``. An alias is
resolved to its version ONCE, and that version is what gets downloaded, so a
promotion that moves the alias in between cannot mix two versions.

Errors are one line: an unknown run, version or alias is ``ModelNotFoundError``
(an alias or registered model that does not exist yet is the subclass
``NoSuchAliasError``, which callers may treat as "no champion yet"); a server
that cannot be reached is ``TrackingError``.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from churnlib.errors import ModelNotFoundError, NoSuchAliasError, TrackingError
from churnlib.model.files import BOOSTER_FILE, SPEC_FILE
from churnlib.model.predictor import ChurnPredictor
from churnlib.tags import TAG_DECISION

_RUNS = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+)$")
_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_LOGGED = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")


@dataclass
class ModelRef:
    """Where a model URI points: always a training run; a registry version when there is one."""

    uri: str
    download_uri: str  # pinned: an alias replaced by its version
    run_id: str | None
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    model_id: str | None = None
    decision: str | None = None  # a registry version's re-derived decision (TAG_DECISION), as stored

    def describe(self) -> str:
        if self.name and self.version:
            at = f"@{self.alias} = " if self.alias else ""
            return f"{self.name} {at}version {self.version}"
        return self.uri


@dataclass
class LoadedModel:
    """A model resolved from a URI: the predictor, where it came from (run, version, alias)."""
    ref: ModelRef
    predictor: ChurnPredictor

    @property
    def spec(self):
        return self.predictor.spec


def _mlflow_error(exc: Exception, uri: str) -> Exception:
    """MlflowException -> ModelNotFoundError (does not exist) or TrackingError (anything else)."""
    from mlflow.exceptions import MlflowException, RestException

    code = getattr(exc, "error_code", "")
    first = (str(getattr(exc, "message", exc)).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, (MlflowException, RestException)) and code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
        return ModelNotFoundError(f"model {uri} does not resolve: {first[:300]}")
    return TrackingError(f"MLflow could not resolve {uri}: {first[:300]}")


def resolve(uri: str) -> ModelRef:
    """What ``uri`` points at, without downloading anything."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = uri.strip()
    client = MlflowClient()
    try:
        if m := _RUNS.match(uri):
            run = client.get_run(m["run"])
            return ModelRef(uri=uri, download_uri=uri, run_id=run.info.run_id)
        if m := _ALIAS.match(uri):
            name, alias = m["name"], m["alias"]
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                # no such registered model, or no such alias on it (stores differ in the code)
                if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise NoSuchAliasError(f"model {uri} does not resolve: {name!r} has no alias {alias!r}") from None
                raise
            return ModelRef(uri, f"models:/{name}/{mv.version}", mv.run_id, name, str(mv.version), alias,
                            getattr(mv, "model_id", None), (mv.tags or {}).get(TAG_DECISION))
        if m := _VERSION.match(uri):
            mv = client.get_model_version(m["name"], m["version"])
            return ModelRef(uri, uri, mv.run_id, mv.name, str(mv.version), None, getattr(mv, "model_id", None),
                            (mv.tags or {}).get(TAG_DECISION))
        if m := _LOGGED.match(uri):
            lm = client.get_logged_model(m["model_id"])
            return ModelRef(uri, uri, lm.source_run_id, model_id=lm.model_id)
    except MlflowException as exc:
        raise _mlflow_error(exc, uri) from None
    except OSError as exc:  # connection refused and friends, below MLflow's own wrapping
        raise TrackingError(f"MLflow could not resolve {uri}: {exc}") from None
    raise ModelNotFoundError(
        f"not a model URI: {uri!r} (use runs:/<run_id>/model, models:/<name>/<version>, models:/<name>@<alias>)"
    )


def load(uri: str, dst: str | Path | None = None) -> LoadedModel:
    """Resolve ``uri`` and load the churn predictor behind it (booster + feature spec + threshold)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = resolve(uri)
    # The predictor reads every file into memory: a download folder of our own is removed at once.
    with contextlib.ExitStack() as stack:
        target = Path(dst) if dst is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="churn-model-")))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri, dst_path=str(target)))
        except MlflowException as exc:
            raise _mlflow_error(exc, uri) from None
        except OSError as exc:
            raise TrackingError(f"could not download {uri}: {exc}") from None
        model_dir = find_model_dir(local)
        if model_dir is None:
            raise ModelNotFoundError(f"{uri} is not a churn model (no artifacts/model_dir with a booster in it)")
        predictor = ChurnPredictor.from_dir(model_dir)
        if ref.decision:
            apply_registry_decision(predictor, ref.decision)
        return LoadedModel(ref=ref, predictor=predictor)


def apply_registry_decision(predictor: ChurnPredictor, stored: str) -> None:
    """A version's decision re-derived for new costs (`churn models decide`, the version's
    ``churn.decision`` tag) replaces the one it was trained with: value, cost, save rate and the
    contact threshold chosen for them travel together."""
    try:
        d = json.loads(stored)
        decision = {k: float(d[k]) for k in ("value_saved", "contact_cost", "save_rate")}
        threshold = None if d["threshold"] is None else float(d["threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(f"the version's {TAG_DECISION} tag is not a decision ({exc}); set it again "
                                 f"with churn models decide") from None
    predictor.meta = {**predictor.meta, "decision": {**decision, "threshold": threshold,
                                                     "threshold_source": str(d.get("threshold_source", "registry"))}}


def find_model_dir(root: Path) -> Path | None:
    """The ``model_dir`` folder inside a downloaded model (where the booster and spec are)."""
    for candidate in (root / "artifacts" / "model_dir", root / "model_dir", root):
        if (candidate / BOOSTER_FILE).is_file() and (candidate / SPEC_FILE).is_file():
            return candidate
    return None


def logged_model_uri(run_id: str, artifact_path: str = "model") -> str:
    """The ``models:/m-<id>`` URI of the model a run logged under ``artifact_path``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise _mlflow_error(exc, f"runs:/{run_id}/{artifact_path}") from None
    outputs = getattr(run, "outputs", None)
    for out in getattr(outputs, "model_outputs", None) or []:
        lm = client.get_logged_model(out.model_id)
        if lm.name == artifact_path:
            return f"models:/{lm.model_id}"
    raise ModelNotFoundError(f"run {run_id} logged no model named {artifact_path!r}")

