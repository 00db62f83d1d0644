"""Ray Serve application: HTTP answers from the registered champion, following its alias.

Endpoints (FastAPI ingress, OpenAPI docs at ``/docs``):

- ``POST /predict``: one record (a JSON object) or a list of records in the raw
  schema (original column names, category strings). Per record: P(churn=1),
  the label at the decision threshold, the model name and version that
  answered, and the customer id when given. A single record answers with an
  object, a list with a list.
- ``POST /explain``: the same input; per record the base value and one SHAP
  contribution per raw feature (exact TreeSHAP via XGBoost ``pred_contribs``)
  and the top reasons.
- ``GET /healthz``: 200 ``ready`` when a model is loaded (``degraded`` when the
  registry cannot be reached or a new version failed to load: the loaded one
  keeps serving), 503 ``not_ready`` with the reason otherwise.
- ``GET /model``: name, version, alias, source run, key metrics, loaded-at.

Bad input is a 4xx, never a 500: a missing field, a wrong type, an unknown
category or an empty list is a 422 naming the record index and the field; a
list longer than ``serve.max_records`` is a 413; a missing or wrong API key
(when ``CHURN_API_KEY`` was set where the app was built) is a 401.

Following the alias: each replica polls the registry every
``serve.poll_interval_s`` (default 10 s) from a background thread. When the
alias points at a new version, the replica loads it BESIDE the old one and
then swaps one reference: requests in flight finish on the version they
started with, new ones get the new version, none is dropped. A version that
fails to load is logged and reported by ``/healthz``; the old one keeps
serving. Polling was chosen over pushing the version through
``user_config``: promotions are made by ``churn models promote``, a separate
process with no handle on the Serve app, and a poll also recovers from a
registry outage by itself. ``user_config`` (``reconfigure``) tunes the poll
interval, batching and the threshold at runtime without restarting replicas.

The model loader is injected: ``RegistryLoader`` (an alias of a registered
model) in production, ``UriLoader`` (one fixed model URI) for a pinned model
and in tests. Nothing here runs at import: ``build_app`` builds the
application (``serve deploy``'s ``import_path: serve.app:build_app``).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints'
# annotations (Request) at runtime, in replicas that get this class by value.
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
from fastapi import Request

from churnlib.errors import NoSuchAliasError

logger = logging.getLogger("ray.serve")

# Registry calls from a replica give up fast: a slow registry must not stall a poll for minutes.
_REPLICA_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


@dataclass
class LoadedVersion:
    """A model ready to answer, with what ``/model`` reports about it."""

    predictor: Any  # churnlib.model.ChurnPredictor
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
    def from_config(cls, cfg: Any, alias: str | None = None) -> "RegistryLoader":
        return cls(cfg.tracking_uri, cfg.registry_uri, cfg.model.registered_name, alias or cfg.serve.alias)

    def describe(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def current(self) -> str:
        """The version behind the alias now; NoSuchAliasError when there is none yet."""
        from churnlib import loading

        _configure_mlflow(self.tracking_uri, self.registry_uri)
        ref = loading.resolve(self.describe())
        return str(ref.version)

    def load(self, version: str) -> LoadedVersion:
        from mlflow import MlflowClient

        from churnlib import loading

        _configure_mlflow(self.tracking_uri, self.registry_uri)
        loaded = loading.load(f"models:/{self.name}/{version}")
        tags = MlflowClient().get_model_version(self.name, version).tags or {}
        metrics = {}
        for key, value in tags.items():
            if key.startswith(("train.", "churn.eval.")) and key != "churn.eval.run_id":
                try:
                    metrics[key] = float(value)
                except ValueError:
                    pass
        return LoadedVersion(loaded.predictor, self.name, str(version), self.alias, loaded.ref.run_id, metrics)


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
        from churnlib import loading

        _configure_mlflow(self.tracking_uri, self.registry_uri)
        loaded = loading.load(key)
        ref = loaded.ref
        name = ref.name or loaded.predictor.meta.get("model_name", "churn")
        version = ref.version or (ref.run_id or key)[:12]
        return LoadedVersion(loaded.predictor, name, str(version), None, ref.run_id)


# Request validation ------------------------------------------------------------------


def record_type(spec: Any):
    """The type of one raw record, from the feature spec (a TypedDict keyed by column name).

    Every feature is required (a key may hold null: a missing value);
    numbers must be finite; categories must be one of the configured levels;
    the id column is optional and passes through; other keys are ignored.
    Validated records are plain dicts, ready for ``to_matrix``.
    """
    from typing import Annotated

    from pydantic import ConfigDict, Field
    from typing_extensions import NotRequired, TypedDict

    fields: dict[str, Any] = {}
    for col in spec.numeric:
        fields[col] = Annotated[Optional[float], Field(allow_inf_nan=False)]
    for col, levels in spec.categorical:
        fields[col] = Optional[Literal[tuple(levels)]]  # type: ignore[misc]
    if spec.id_column:
        fields[spec.id_column] = NotRequired[Optional[Union[int, str]]]
    record = TypedDict("CustomerRecord", fields)  # type: ignore[misc]
    record.__pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[attr-defined]
    return record


class Validator:
    """Request bodies -> validated records, parsed and checked by pydantic-core in one pass."""

    def __init__(self, spec: Any, max_records: int):
        from pydantic import TypeAdapter

        self.record = TypeAdapter(record_type(spec))
        self.records = TypeAdapter(list[record_type(spec)])  # type: ignore[misc]
        self.max_records = max_records
        self.id_column = spec.id_column

    def schema(self) -> dict[str, Any]:
        one = self.record.json_schema()
        many = {"type": "array", "items": one, "minItems": 1, "maxItems": self.max_records}
        return {"anyOf": [one, many]}

    def parse(self, body: bytes) -> tuple[list[dict], list, bool]:
        """-> (records, customer ids, single?) or RequestError (413/422) naming record and field."""
        from pydantic import ValidationError

        start = body.lstrip()[:1]
        if start == b"{":
            adapter, single = self.record, True
        elif start == b"[":
            # records hold scalars only: more '{' than allowed records is too many, before any parsing
            if body.count(b"{") > self.max_records:
                raise RequestError(413, f"more than {self.max_records} records in one request; at most {self.max_records} (serve.max_records)")
            adapter, single = self.records, False
        else:
            raise RequestError(422, "send one record (a JSON object) or a list of records (a JSON array)")
        try:
            parsed = adapter.validate_json(body)
        except ValidationError as exc:
            errors = []
            for err in exc.errors(include_url=False, include_input=False):
                loc = list(err.get("loc") or ())
                if err["type"] == "json_invalid":
                    raise RequestError(422, f"the body is not valid JSON: {err['msg']}") from None
                index = loc.pop(0) if not single and loc and isinstance(loc[0], int) else 0
                if not single and not loc and err["type"] != "list_type":
                    field = None
                else:
                    field = str(loc[0]) if loc else None
                errors.append({"record": index, "field": field, "message": err["msg"], "type": err["type"]})
            first = errors[0]
            where = f"record {first['record']}" + (f", field {first['field']!r}" if first["field"] else "")
            raise RequestError(422, f"{where}: {first['message']}", errors) from None
        records = [parsed] if single else parsed
        if not records:
            raise RequestError(422, "empty list: send one record or a list of at least one record")
        if len(records) > self.max_records:
            raise RequestError(413, f"{len(records)} records in one request; at most {self.max_records} (serve.max_records)")
        ids = [r.pop(self.id_column, None) for r in records] if self.id_column else [None] * len(records)
        return records, ids, single


class RequestError(Exception):
    """A client error with its HTTP status and a JSON body."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors or []


# The deployment ----------------------------------------------------------------------------


def make_deployment(spec: Any, settings: dict[str, Any]):
    """The FastAPI app and the Serve deployment class for one feature spec."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    def _json(payload: Any) -> Response:
        """Serialised here: FastAPI's generic encoder costs more than the model on small requests."""
        return Response(content=json.dumps(payload, separators=(",", ":")), media_type="application/json")
    from ray import serve

    from churnlib.errors import FeatureError
    from churnlib.explain import explain, top_reasons
    from churnlib.features import to_matrix

    validator = Validator(spec, settings["max_records"])
    openapi_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": validator.schema()}}}}
    app = FastAPI(
        title="Churn prediction",
        description="P(churn) and SHAP explanations from the registered champion model.",
        version="1",
    )
    @serve.deployment(name="ChurnService")
    @serve.ingress(app)
    class ChurnService:
        def __init__(self, loader: Any, settings: dict[str, Any]):
            from ray.serve import metrics

            self._loader = loader
            self._settings = dict(settings)
            self._model: LoadedVersion | None = None
            self._loaded_key: str | None = None
            self._registry_error: str | None = None
            self._load_error: str | None = None
            self._reason: str | None = "starting"
            self._failed: set[str] = set()
            self._lock = threading.Lock()  # one refresh at a time (poll thread vs a manual one)
            self._predictions = metrics.Counter(
                "churn_predictions", description="Records scored, by model version and label.",
                tag_keys=("model_version", "label"),
            )
            self._latency = metrics.Histogram(
                "churn_model_latency_ms", description="Feature encoding + model time per request, ms.",
                boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000], tag_keys=("model_version", "endpoint"),
            )
            self._api_key_hash = settings.get("api_key_sha256")
            self.refresh()
            self._stop = threading.Event()
            if loader.follows_alias:
                threading.Thread(target=self._follow, name="churn-follow-alias", daemon=True).start()

        # Following the alias -----------------------------------------------------------

        def _follow(self) -> None:
            while not self._stop.wait(self._settings["poll_interval_s"]):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - the poll thread must never die
                    logger.exception("churn: refresh failed")

        def refresh(self) -> None:
            """Check the alias; load a new version beside the current one, then swap."""
            with self._lock:
                try:
                    key = self._loader.current()
                except NoSuchAliasError as exc:
                    self._registry_error = None
                    if self._model is None:
                        self._reason = f"no model yet: {exc}"
                    return
                except Exception as exc:  # noqa: BLE001 - registry down: keep what we have
                    message = f"registry unreachable: {_one_line(exc)}"
                    if message != self._registry_error:
                        logger.warning("churn: %s; serving %s", message, self._model.version if self._model else "nothing")
                    self._registry_error = message
                    if self._model is None:
                        self._reason = message
                    return
                self._registry_error = None
                current = self._model
                if current is not None and key == self._loaded_key:
                    self._load_error = None  # the alias is (back) on what we serve
                    return
                try:
                    new = self._loader.load(key)
                    if self._settings.get("gpus", 0) > 0:
                        new.predictor.booster.set_param({"device": "cuda"})
                except Exception as exc:  # noqa: BLE001 - a bad version must not take the good one down
                    self._load_error = f"version {key} failed to load: {_one_line(exc)}"
                    if key not in self._failed:
                        self._failed.add(key)
                        logger.error("churn: %s; still serving %s", self._load_error,
                                     current.version if current else "nothing")
                    if current is None:
                        self._reason = self._load_error
                    return
                self._model, self._loaded_key = new, key  # the swap: requests in flight keep theirs
                self._load_error = None
                self._reason = None
                logger.info("churn: now serving %s version %s", new.name, new.version)

        def reconfigure(self, user_config: dict[str, Any]) -> None:
            """Runtime tuning from ``user_config``: poll interval, batching, threshold."""
            known = {"poll_interval_s", "max_batch_size", "batch_wait_timeout_s", "decision_threshold"}
            unknown = set(user_config or {}) - known
            if unknown:
                raise ValueError(f"unknown user_config key(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
            self._settings.update(user_config or {})
            if "max_batch_size" in user_config:
                self._score_one.set_max_batch_size(int(user_config["max_batch_size"]))
            if "batch_wait_timeout_s" in user_config:
                self._score_one.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

        # Helpers --------------------------------------------------------------------------

        def _threshold(self, model: LoadedVersion) -> float:
            return float(self._settings.get("decision_threshold") or model.predictor.threshold)

        def _authorize(self, request: Request) -> None:
            if not self._api_key_hash:
                return
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            given = hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
            if not hmac.compare_digest(given, self._api_key_hash):
                raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

        def _ready_model(self) -> LoadedVersion:
            model = self._model
            if model is None:
                raise RequestError(503, self._reason or "no model loaded")
            return model

        @staticmethod
        def _error(exc: RequestError) -> JSONResponse:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            body: dict[str, Any] = {"detail": exc.message}
            if exc.errors:
                body["errors"] = exc.errors
            return JSONResponse(body, status_code=exc.status, headers=headers)

        async def _records(self, request: Request) -> tuple[list[dict], list, bool]:
            self._authorize(request)
            return validator.parse(await request.body())

        def _matrix(self, model: LoadedVersion, records: list[dict]) -> np.ndarray:
            try:
                return to_matrix(records, model.predictor.spec)
            except FeatureError as exc:
                row = exc.rows[0] if exc.rows else 0
                raise RequestError(422, f"record {row}: {exc}", [
                    {"record": int(r), "field": exc.column, "message": str(exc), "type": "feature_error"} for r in exc.rows[:100]
                ]) from None

        @serve.batch(max_batch_size=settings["max_batch_size"], batch_wait_timeout_s=settings["batch_wait_timeout_s"])
        async def _score_one(self, items: list[tuple[LoadedVersion, np.ndarray]]) -> list[float]:
            """Single-record requests, scored together: one predict call per model in the batch."""
            out = [0.0] * len(items)
            groups: dict[int, list[int]] = {}
            for i, (model, _) in enumerate(items):
                groups.setdefault(id(model), []).append(i)
            for idx in groups.values():
                model = items[idx[0]][0]
                X = np.vstack([items[i][1] for i in idx])
                proba = model.predictor.booster.inplace_predict(X)
                for i, p in zip(idx, proba):
                    out[i] = float(p)
            return out

        def _labels(self, model: LoadedVersion, proba: np.ndarray, endpoint: str, started: float) -> np.ndarray:
            """Labels at the threshold; records the latency and the prediction counters."""
            threshold = self._threshold(model)
            labels = (proba >= threshold).astype(int)
            self._latency.observe((time.perf_counter() - started) * 1000.0,
                                  tags={"model_version": model.version, "endpoint": endpoint})
            n_pos = int(labels.sum())
            if n_pos:
                self._predictions.inc(n_pos, tags={"model_version": model.version, "label": "1"})
            if len(labels) - n_pos:
                self._predictions.inc(len(labels) - n_pos, tags={"model_version": model.version, "label": "0"})
            return labels

        # Endpoints ---------------------------------------------------------------------------

        @app.post("/predict", openapi_extra=openapi_body, summary="P(churn) and label per record")
        async def predict(self, request: Request):
            try:
                records, ids, single = await self._records(request)
                model = self._ready_model()
                started = time.perf_counter()
                X = self._matrix(model, records)
                if single:
                    proba = np.array([await self._score_one((model, X))], dtype=np.float32)
                else:
                    proba = model.predictor.booster.inplace_predict(X)
            except RequestError as exc:
                return self._error(exc)
            labels = self._labels(model, proba, "predict", started)
            answers = []
            for i, p in enumerate(proba):
                a = {"churn_probability": float(p), "churn_label": int(labels[i]),
                     "model_name": model.name, "model_version": model.version}
                if ids[i] is not None:
                    a["customer_id"] = ids[i]
                answers.append(a)
            return _json(answers[0] if single else answers)

        @app.post("/explain", openapi_extra=openapi_body, summary="SHAP contributions per raw feature")
        async def explain_records(self, request: Request):
            try:
                records, ids, single = await self._records(request)
                model = self._ready_model()
                started = time.perf_counter()
                X = self._matrix(model, records)
            except RequestError as exc:
                return self._error(exc)
            spec_m = model.predictor.spec
            expl = explain(model.predictor.booster, X, spec_m, "tree", nthread=1)
            proba = 1.0 / (1.0 + np.exp(-expl.margin))
            labels = self._labels(model, proba, "explain", started)
            reasons = top_reasons(expl, spec_m, k=self._settings["top_reasons"])
            answers = []
            for i in range(len(X)):
                a = {
                    "churn_probability": float(proba[i]),
                    "churn_label": int(labels[i]),
                    "base_value": float(expl.base_values[i]),
                    "contributions": {f: float(v) for f, v in zip(expl.feature_names, expl.values[i])},
                    "top_reasons": reasons[i],
                    "units": "log-odds",
                    "model_name": model.name,
                    "model_version": model.version,
                }
                if ids[i] is not None:
                    a["customer_id"] = ids[i]
                answers.append(a)
            return _json(answers[0] if single else answers)

        @app.get("/healthz", summary="ready / degraded / not_ready")
        def healthz(self):
            model = self._model
            problems = [p for p in (self._registry_error, self._load_error) if p]
            if model is None:
                status, code = "not_ready", 503
            else:
                status, code = ("degraded" if problems else "ready"), 200
            body = {
                "status": status,
                "ready": model is not None,
                "source": self._loader.describe(),
                "model": {"name": model.name, "version": model.version} if model else None,
                "registry": self._registry_error or "ok",
                "last_load_error": self._load_error,
            }
            if model is None:
                body["reason"] = self._reason
            return JSONResponse(body, status_code=code)

        @app.get("/model", summary="the model that answers")
        def model_info(self):
            model = self._model
            if model is None:
                return JSONResponse({"detail": self._reason or "no model loaded"}, status_code=503)
            return {**model.describe(), "source": self._loader.describe()}

    return ChurnService


def settings_from_config(cfg: Any, api_key_sha256: str | None = None) -> dict[str, Any]:
    """The deployment's settings; the API key as its SHA-256 (given, or of ``CHURN_API_KEY``)."""
    s = cfg.serve
    key = os.environ.get("CHURN_API_KEY")
    if api_key_sha256 is None and key:
        api_key_sha256 = hashlib.sha256(key.encode()).hexdigest()
    return {
        "poll_interval_s": s.poll_interval_s,
        "max_batch_size": s.max_batch_size,
        "batch_wait_timeout_s": s.batch_wait_timeout_s,
        "max_records": s.max_records,
        "top_reasons": s.top_reasons,
        "decision_threshold": cfg.model.decision_threshold,
        "gpus": s.gpus_per_replica,
        # only a hash of the key travels in the deployment's arguments
        "api_key_sha256": api_key_sha256,
    }


def build_app(args: dict[str, Any] | None = None):
    """Application builder: ``serve deploy`` (``import_path: serve.app:build_app``) and ``churn serve``.

    ``args``: ``config`` (YAML file(s)), ``set`` (``key=value`` overrides),
    ``alias``, ``replicas``, ``model_uri`` (serve one fixed model instead of
    following an alias) and, from Python, ``loader`` (any object with
    ``current``/``load``/``describe``/``follows_alias``; tests pass a
    ``UriLoader`` of a small real model).
    """
    from churnlib.config import load_config
    from churnlib.features import FeatureSpec

    args = dict(args or {})
    cfg = load_config(args.get("config"), args.get("set"))
    loader = args.get("loader")
    if loader is None:
        if args.get("model_uri"):
            loader = UriLoader(args["model_uri"], cfg.tracking_uri, cfg.registry_uri)
        else:
            loader = RegistryLoader.from_config(cfg, alias=args.get("alias"))
    settings = settings_from_config(cfg, args.get("api_key_sha256"))
    settings.update(args.get("settings") or {})
    deployment = make_deployment(FeatureSpec.from_config(cfg.features), settings)
    actor_options: dict[str, Any] = {"num_cpus": cfg.serve.cpus_per_replica}
    if cfg.serve.gpus_per_replica:
        actor_options["num_gpus"] = cfg.serve.gpus_per_replica
    return deployment.options(
        num_replicas=int(args.get("replicas") or cfg.serve.replicas),
        max_ongoing_requests=cfg.serve.max_ongoing_requests,
        ray_actor_options=actor_options,
        logging_config={"enable_access_log": cfg.serve.access_log},
    ).bind(loader, settings)
