"""Ray Serve application: HTTP answers from the registered champion, following its alias.

Endpoints (FastAPI ingress, OpenAPI docs at ``/docs``):

- ``POST /predict``: one record (a JSON object) or a list of records in the raw
  schema (original column names, category strings). Per record: P(churn=1),
  the label at the decision threshold, the expected net value of contacting
  the customer and whether to (``churnlib.decision``, the config's
  ``decision``), the model name and version that answered, and the customer id
  when given. A single record answers with an
  object, a list with a list.
- ``POST /explain``: the same input; per record the base value and one SHAP
  contribution per raw feature (exact TreeSHAP via XGBoost ``pred_contribs``)
  and the top reasons.
- ``GET /healthz``: 200 ``ready`` when a model is loaded (``degraded`` when the
  registry cannot be reached or a new version failed to load: the loaded one
  keeps serving), 503 ``not_ready`` with the reason otherwise.
- ``GET /model``: name, version, alias, source run, key metrics, loaded-at, the
  threshold in force and the decision settings.

Bad input is a 4xx, never a 500 (``serve/validation.py``): 422 naming the
record and the field, 413 past the body or record limits (``/explain`` has its
own, smaller one), 401 for a missing or wrong API key. ``/explain`` runs its
SHAP work on one thread of its own, off the event loop, so large explanations
queue among themselves and never stall ``/predict``.

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

The model loader is injected (``serve/loaders.py``): ``RegistryLoader`` (an
alias of a registered model) in production, ``UriLoader`` (one fixed model
URI) for a pinned model and in tests. The deployment class is defined here,
at module level, and replicas import it; nothing runs at import. ``build_app``
builds the application (``serve deploy``'s ``import_path: serve.app:build_app``).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints'
# annotations (Request) at runtime.
import asyncio
import datetime
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from churnlib.config import Config, load_config
from churnlib.data.features import FeatureSpec, to_matrix
from churnlib.decision.value import Decision, expected_value
from churnlib.errors import FeatureError, NoSuchAliasError, one_line
from churnlib.model.explain import top_reasons
from churnlib.monitor.live import LiveWindow, measure
from churnlib.predlog.writer import Answered, LogWriter
from churnlib.rollout.state import Rollout
from serve.loaders import LoadedVersion, RegistryLoader, UriLoader
from serve.validation import Limits, RequestError, Validator

logger = logging.getLogger("ray.serve")

__all__ = ["ChurnService", "RegistryLoader", "UriLoader", "build_app", "settings_from_config"]


def _json(payload: Any) -> Response:
    """Serialised here: FastAPI's generic encoder costs more than the model on small requests."""
    return Response(content=json.dumps(payload, separators=(",", ":")), media_type="application/json")


# What the OpenAPI document shows of the answers (the handlers write JSON themselves) ----------------


class ErrorBody(BaseModel):
    """The body of every error response: what went wrong, in one line."""
    detail: str = Field(description="what went wrong, in one line", examples=["record 0, field 'Tenure': Field required"])
    errors: Optional[list[dict[str, Any]]] = Field(
        None, description="every problem found: record index, field, message, type",
        examples=[[{"record": 0, "field": "Tenure", "message": "Field required", "type": "missing"}]])


class PredictAnswer(BaseModel):
    """The answer for one record (a list of records gets a list of these, in order)."""
    churn_probability: float = Field(description="P(churn) for this customer, 0-1", examples=[0.8731])
    churn_label: int = Field(description="1 when churn_probability >= the decision threshold, else 0", examples=[1])
    expected_value: Optional[float] = Field(
        None, description="expected net value of contacting this customer: churn_probability x save_rate x "
                          "value_saved - contact_cost (the decision settings, see GET /model), in their currency",
        examples=[40.47])
    contact: Optional[bool] = Field(None, description="whether to contact this customer: churn_probability >= "
                                                      "the contact threshold (GET /model; a capacity limits a "
                                                      "batch run, not one request)", examples=[True])
    model_name: str = Field(description="registered model that answered", examples=["xgboost_churn_model"])
    model_version: str = Field(description="its version (the one behind the alias when the request came in)",
                               examples=["3"])
    customer_id: Optional[Union[int, str]] = Field(None, description="the record's id column, echoed when sent",
                                                   examples=[2])


class Reason(BaseModel):
    """One feature's push on the score."""
    feature: str = Field(examples=["Support Calls"])
    value: Any = Field(description="the record's raw value", examples=[7])
    contribution: float = Field(description="SHAP contribution, log-odds", examples=[1.42])


class ExplainAnswer(PredictAnswer):
    """P(churn) with its SHAP decomposition: base_value + sum(contributions) = log-odds of churn_probability."""
    base_value: float = Field(description="the model's average output, log-odds", examples=[-0.12])
    contributions: dict[str, float] = Field(description="SHAP contribution per raw feature, log-odds",
                                            examples=[{"Support Calls": 1.42, "Age": 0.31}])
    top_reasons: list[Reason] = Field(description="the features that pushed the score most, largest first")
    units: str = Field(description="unit of base_value and contributions", examples=["log-odds"])


class Health(BaseModel):
    """Readiness: 200 ready/degraded while a model is loaded, 503 not_ready before."""
    status: Literal["ready", "degraded", "not_ready"]
    ready: bool
    source: str = Field(description="what the service follows", examples=["models:/xgboost_churn_model@champion"])
    model: Optional[dict[str, str]] = Field(None, examples=[{"name": "xgboost_churn_model", "version": "3"}])
    registry: str = Field(description="'ok', or why the registry cannot be reached", examples=["ok"])
    last_load_error: Optional[str] = Field(None, description="why the latest version could not be loaded")
    reason: Optional[str] = Field(None, description="why no model is loaded (not_ready only)")


class DecisionInfo(BaseModel):
    """What contacting a customer is worth: the version's decision (chosen at training, or re-derived
    for new costs by ``churn models decide``); the config's for a model that carries none."""
    value_saved: float = Field(description="kept when a churner is saved", examples=[500.0])
    contact_cost: float = Field(description="cost of one contact and its offer", examples=[25.0])
    save_rate: float = Field(description="share of contacted churners who stay", examples=[0.25])
    break_even: float = Field(description="the P(churn) above which a contact pays for itself", examples=[0.2])
    contact_threshold: Optional[float] = Field(
        description="contact from this P(churn): decision.threshold, or the cut worth most on the validation rows "
                    "when the model was trained, or the one `churn models decide` recorded on the version (null: no "
                    "cut paid, contact nobody)", examples=[0.23])
    threshold_source: Optional[str] = Field(
        None, description="where the contact threshold comes from: auto (chosen at training), fixed, break-even, "
                          "best cut on data (churn models decide)", examples=["auto"])


class ModelInfo(BaseModel):
    """The version that answers, where it comes from and how it scored."""
    name: str = Field(examples=["xgboost_churn_model"])
    version: str = Field(examples=["3"])
    alias: Optional[str] = Field(None, examples=["champion"])
    run_id: Optional[str] = Field(None, description="the MLflow run that trained it")
    metrics: dict[str, float] = Field(description="its training and evaluation metrics (registry tags)",
                                      examples=[{"churn.eval.roc_auc": 0.951, "train.best_valid_auc": 0.962}])
    loaded_at: str = Field(description="UTC, ISO 8601", examples=["2026-12-01T10:00:00Z"])
    decision_threshold: float = Field(description="the threshold in force for churn_label (contact: "
                                                  "decision.contact_threshold)",
                                      examples=[0.5])
    decision: Optional[DecisionInfo] = Field(None, description="what a contact is worth")
    calibration: str = Field(description="how the booster's output becomes churn_probability (fitted at "
                                         "training on the validation rows)",
                             examples=["platt (P = sigmoid(1.1234 x margin -0.0567), 1600 rows)"])
    features: list[str]
    source: str = Field(examples=["models:/xgboost_churn_model@champion"])


ERRORS = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key (`Authorization: Bearer <key>`)"},
    413: {"model": ErrorBody, "description": "Body larger than serve.max_body_bytes, or more records than allowed"},
    422: {"model": ErrorBody, "description": "Not a valid record: `detail` names the record and the field, "
                                             "`errors` lists every problem"},
    503: {"model": ErrorBody, "description": "No model loaded yet (`detail` says why)"},
}
RECORD_SCHEMA = "CustomerRecord"


def _answers(model: Any, description: str) -> dict[int, Any]:
    """The 200 answer (one object for one record, a list for a list) and the errors."""
    return {200: {"model": Union[model, list[model]], "description": description}, **ERRORS}


def _document(api: FastAPI, validator: Validator) -> None:
    """The request schema of /predict and /explain from this replica's feature spec: the record is
    a named schema (``CustomerRecord``, in the Schemas section) with the configured example."""
    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas[RECORD_SCHEMA] = validator.record.json_schema()
            ref = {"$ref": f"#/components/schemas/{RECORD_SCHEMA}"}
            for path, limit in (("/predict", validator.limits.max_records),
                                ("/explain", validator.limits.max_explain_records)):
                post = doc.get("paths", {}).get(path, {}).get("post")
                if post is not None:
                    many = {"type": "array", "items": ref, "minItems": 1, "maxItems": limit}
                    media: dict[str, Any] = {"schema": {"anyOf": [ref, many]}}
                    if validator.example:
                        media["examples"] = {
                            "one": {"summary": "one customer: an object in, an object out", "value": validator.example},
                            "many": {"summary": "a list of customers: a list in, a list out",
                                     "value": [validator.example]},
                        }
                    post["requestBody"] = {"required": True, "content": {"application/json": media}}
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi_schema = None
    api.openapi = openapi  # type: ignore[method-assign]


def _node_metrics_url() -> str:
    """Where Ray's metrics agent of this process's node answers (``/metrics`` on its export port)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise RuntimeError(f"node {node_id} is not in the cluster's node table")


# Swagger UI 5 from the fastapi-offline package, served here: /docs works with no internet.
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
               "favicon.png": "image/png"}


def _asset(name: str) -> Response:
    from importlib import resources

    if name not in DOCS_ASSETS:
        return JSONResponse({"detail": f"no asset named {name!r}"}, status_code=404)
    body = resources.files("fastapi_offline").joinpath("static", name).read_bytes()
    return Response(body, media_type=DOCS_ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})


# Shadow scoring waits this long after the first queued request, so that one matrix and one
# predict call serve many requests (a predict call's fixed cost is most of a single record's)
_SHADOW_GATHER_S = 0.02


# The deployment: defined at import (Serve serialises it here), so everything it uses is above.
app = FastAPI(title="Churn prediction", version="1", docs_url=None, redoc_url=None,
              description="P(churn) and SHAP explanations from the registered champion model. "
                          "Send records in the raw schema of the training table (`CustomerRecord` below).")


@serve.deployment(name="ChurnService")
@serve.ingress(app)
class ChurnService:
    """One replica: the model behind the alias (or a fixed URI), request validation, scoring."""

    def __init__(self, loader: Any, settings: dict[str, Any], spec: dict[str, Any]):
        from ray.serve import metrics

        self._loader = loader
        self._settings = dict(settings)
        docs = settings.get("docs") or {}
        self._validator = Validator(FeatureSpec.from_dict(spec), Limits.from_settings(settings),
                                    docs.get("descriptions"), docs.get("example"))
        self._model: Optional[LoadedVersion] = None
        self._loaded_key: Optional[str] = None
        self._registry_error: Optional[str] = None
        self._load_error: Optional[str] = None
        self._reason: Optional[str] = "starting"
        self._failed: set[str] = set()
        # a rollout: (its state, the challenger loaded beside the champion), swapped as one reference
        self._route: Optional[tuple[Rollout, LoadedVersion]] = None
        self._challenger_key: Optional[str] = None
        self._rollout_error: Optional[str] = None  # the rollout's: unreadable, or a challenger that fails to load
        self._challenger_error: Optional[str] = None  # the loaded challenger's last scoring failure
        # shadow scoring: requests queued here, scored together on a thread of its own
        # (challenger, records, ids, request id, the champion's matrix when the features are the same)
        self._shadow_jobs: list[tuple[LoadedVersion, list[dict], list, str, Optional[np.ndarray]]] = []
        self._shadow_lock = threading.Lock()
        self._shadow_ready = threading.Event()
        self._same_spec: dict[tuple[int, int], bool] = {}
        threading.Thread(target=self._shadow_loop, name="churn-shadow", daemon=True).start()
        self._lock = threading.Lock()  # one refresh at a time (poll thread vs a manual one)
        # SHAP on one thread of its own: explanations queue among themselves, /predict stays on the loop
        self._explain_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="churn-explain")
        self._predictions = metrics.Counter(
            "churn_predictions", description="Records scored, by model version and label.",
            tag_keys=("model_version", "label"),
        )
        self._latency = metrics.Histogram(
            "churn_model_latency_ms", description="Feature encoding + model time per request, ms.",
            boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000], tag_keys=("model_version", "endpoint"),
        )
        self._challenger_requests = metrics.Counter(
            "churn_challenger_requests", description="A rollout's challenger, requests by mode and outcome: shadow "
            "scored, skipped (the shadow queue full: rollout.shadow_queue) or failed (the challenger raised); canary "
            "answered, or fell_back (the challenger raised: the champion answered those records).",
            tag_keys=("model_version", "mode", "outcome"))
        self._api_key_hash = settings.get("api_key_sha256")
        self._metrics_url: Optional[str] = None
        self._score_one.set_max_batch_size(int(settings["max_batch_size"]))
        self._score_one.set_batch_wait_timeout_s(float(settings["batch_wait_timeout_s"]))
        _document(app, self._validator)
        self._log: Optional[LogWriter] = None
        # request ids for the log when the client sends none: this replica's prefix and a counter
        self._request_prefix, self._request_seq = f"{uuid.uuid4().hex[:12]}-", itertools.count()
        log = settings.get("log")
        if log:
            rows = metrics.Counter(
                "churn_prediction_log_rows", description="Prediction log rows by what became of them: queued, "
                "written (loaded at the first try), spooled (waiting on disk: the database was down), replayed "
                "(loaded after that), dropped (the spool could not be written), rejected (refused by the database "
                "for their content, kept aside).",
                tag_keys=("kind",),
            )
            self._log = LogWriter(log["uri"], log["spool_dir"], batch_rows=log["batch_rows"],
                                  flush_interval_s=log["flush_interval_s"], queue_max=log["queue_max"],
                                  retry_s=log["retry_s"], on_count=lambda kind, n: rows.inc(n, tags={"kind": kind}),
                                  close_timeout_s=self._close_timeout_s())
        self._live: Optional[LiveWindow] = None
        self._live_version: Optional[str] = None
        self._live_psi = metrics.Gauge(
            "churn_live_psi", description="PSI of each feature over the replica's last monitoring.live_window_rows "
            "records against the training profile.", tag_keys=("model_version", "feature"))
        self._live_scores = metrics.Gauge(
            "churn_live_score_share", description="Share of the replica's last records per tenth of P(churn).",
            tag_keys=("model_version", "bin"))
        self.refresh()
        self._stop = threading.Event()
        if loader.follows_alias:
            threading.Thread(target=self._follow, name="churn-follow-alias", daemon=True).start()
        if settings.get("live"):
            threading.Thread(target=self._measure_live, name="churn-live-drift", daemon=True).start()

    # Following the alias -----------------------------------------------------------

    def _follow(self) -> None:
        while not self._stop.wait(self._settings["poll_interval_s"]):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the poll thread must never die
                logger.exception("churn: refresh failed")

    def refresh(self) -> None:
        """Check the alias (and the rollout); load a new version beside the current one, then swap."""
        with self._lock:
            self._refresh_champion()
            # a rollout challenges the champion: only an app that follows `champion` takes part
            if hasattr(self._loader, "rollout") and getattr(self._loader, "alias", None) == "champion":
                self._refresh_rollout()

    def _refresh_champion(self) -> None:
        try:
            key = self._loader.current()
        except NoSuchAliasError as exc:
            self._registry_error = None
            if self._model is None:
                self._reason = f"no model yet: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - registry down: keep what we have
            message = f"registry unreachable: {one_line(exc)}"
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
            self._load_error = f"version {key} failed to load: {one_line(exc)}"
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

    def _refresh_rollout(self) -> None:
        """Follow the registry's rollout: load its challenger beside the champion (as a new champion
        is loaded), drop it when the rollout ends. A challenger that cannot be loaded leaves the
        champion answering alone (said on /healthz); a registry that cannot be read keeps what is."""
        try:
            rollout = self._loader.rollout()
        except Exception as exc:  # noqa: BLE001 - registry down or an unreadable tag: keep the route
            self._rollout_error = f"rollout unreadable: {one_line(exc)}"
            return
        champion = self._model
        if rollout is None or champion is None or rollout.version == champion.version:
            if self._route is not None:
                logger.info("churn: rollout over; champion %s answers alone", champion.version if champion else "-")
            self._route, self._challenger_key, self._rollout_error = None, None, None
            self._challenger_error = None
            return
        key = None
        try:
            key = self._loader.key_of(rollout.version)
            if key in self._failed:  # said once; tried again only for a new key (a re-derived decision)
                self._route, self._challenger_key = None, None
                return
            challenger = self._route[1] if self._route is not None and key == self._challenger_key else None
            if challenger is None:
                challenger = self._loader.load(key, alias="challenger")
                if self._settings.get("gpus", 0) > 0:
                    challenger.predictor.booster.set_param({"device": "cuda"})
                logger.info("churn: challenger version %s loaded (%s)", challenger.version, rollout.mode)
        except Exception as exc:  # noqa: BLE001 - a bad challenger never touches the champion's answers
            message = f"challenger version {rollout.version} failed to load: {one_line(exc)}"
            if message != self._rollout_error:
                logger.error("churn: %s; champion %s answers alone", message, champion.version)
            if key is not None:
                self._failed.add(key)
            self._route, self._challenger_key, self._rollout_error = None, None, message
            return
        if key != self._challenger_key:  # a new challenger: the old one's scoring error is not its
            self._challenger_error = None
        self._route, self._challenger_key, self._rollout_error = (rollout, challenger), key, None

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
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def _body(self, request: Request) -> bytes:
        """The body of an authorized request (401 first), refused (413) past
        ``serve.max_body_bytes`` before more of it is read."""
        self._authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit():
            self._validator.check_size(int(declared))
            return await request.body()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            self._validator.check_size(size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _records(self, request: Request):
        return self._validator.parse(await self._body(request))

    def _matrix(self, model: LoadedVersion, records: list[dict]) -> np.ndarray:
        try:
            return to_matrix(records, model.predictor.spec)
        except FeatureError as exc:
            row = exc.rows[0] if exc.rows else 0
            raise RequestError(422, f"record {row}: {exc}", [
                {"record": int(r), "field": exc.column, "message": str(exc), "type": "feature_error"} for r in exc.rows[:100]
            ]) from None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _score_one(self, items: list[tuple[LoadedVersion, np.ndarray]]) -> list[float]:
        """Single-record requests, scored together: one predict call per model in the batch."""
        out = [0.0] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        for idx in groups.values():
            model = items[idx[0]][0]
            X = np.vstack([items[i][1] for i in idx])
            proba = model.predictor.score(X)
            for i, p in zip(idx, proba):
                out[i] = float(p)
        return out

    def _decision(self, model: LoadedVersion) -> Optional[Decision]:
        """The version's decision (its contact threshold was chosen for it: at training, or by
        `churn models decide`, which a replica picks up like a new version); the config's for a
        model that carries none (None: neither)."""
        d = self._settings.get("decision")
        configured = Decision(d["value_saved"], d["contact_cost"], d["save_rate"]) if d else None
        return model.predictor.decision or configured

    def _contact_threshold(self, model: LoadedVersion) -> float:
        """``decision.threshold`` when set to a number; else the cut the model was trained with."""
        fixed = (self._settings.get("decision") or {}).get("threshold")
        return model.predictor.contact_threshold(fixed, self._decision(model))

    def _decide(self, model: LoadedVersion, answers: list[dict[str, Any]],
                proba: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Add to each answer the expected value of contacting the customer, and whether to
        (the settings and the threshold looked up once per request) -> (values, contact), or None
        for a model without a decision."""
        decision = self._decision(model)
        if decision is None:
            return None
        values = expected_value(proba, decision)
        contact = np.asarray(proba, dtype=np.float64) >= self._contact_threshold(model)
        for a, v, c in zip(answers, values.tolist(), contact.tolist()):
            a["expected_value"], a["contact"] = v, c
        return values, contact

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

    def _explain(self, model: LoadedVersion, X: np.ndarray, ids: list, started: float,
                 request: Request) -> list[dict[str, Any]]:
        """SHAP answers for a validated matrix (on the explain thread), recorded in the log."""
        spec_m = model.predictor.spec
        expl = model.predictor.explain(X, "tree", nthread=1)
        proba = model.predictor.score(X)  # as /predict answers it (isotonic: not the margin's sigmoid)
        cal = model.predictor.calibrator
        units = "log-odds" if cal is None or cal.additive else "log-odds before calibration"
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
                "units": units,
                "model_name": model.name,
                "model_version": model.version,
            }
            if ids[i] is not None:
                a["customer_id"] = ids[i]
            answers.append(a)
        decided = self._decide(model, answers, proba)
        self._record(self._request_id(request), model, "explain", ids, X, proba, labels, decided,
                     (time.perf_counter() - started) * 1000.0)
        return answers

    def _observe(self, model: LoadedVersion, X: np.ndarray, proba: np.ndarray) -> None:
        """The scored rows into the live window (a copy; measured on the live-drift thread)."""
        live = self._settings.get("live")
        if not live:
            return
        if self._live is None or self._live_version != model.version:  # a new version: a new window
            self._live, self._live_version = LiveWindow(X.shape[1], int(live["rows"])), model.version
        self._live.add(X, np.asarray(proba, dtype=np.float32))

    def _measure_live(self) -> None:
        live = self._settings["live"]
        while not self._stop.wait(float(live["interval_s"])):
            try:
                model, window = self._model, self._live
                if model is None or window is None or self._live_version != model.version:
                    continue
                found = measure(window, model.predictor.profile, model.predictor.spec, live["psi_moderate"],
                                live["psi_major"])
                for feature, value in found["psi"].items():
                    self._live_psi.set(value, tags={"model_version": model.version, "feature": feature})
                for i, share in enumerate(found["score_shares"]):
                    self._live_scores.set(share, tags={"model_version": model.version,
                                                       "bin": f"{i / 10:.1f}-{(i + 1) / 10:.1f}"})
            except Exception:  # noqa: BLE001 - the thread must never die
                logger.exception("churn: live drift failed")

    def _request_id(self, request: Request) -> str:
        return request.headers.get("x-request-id") or f"{self._request_prefix}{next(self._request_seq):x}"

    def _record(self, request_id: str, model: LoadedVersion, endpoint: str, ids: list, X: np.ndarray,
                proba: np.ndarray, labels: np.ndarray, decided: Optional[tuple[np.ndarray, np.ndarray]],
                latency_ms: Optional[float] = None, route: Optional[str] = None) -> None:
        """Hand the request's answers to the prediction log's writer: one item, the arrays as they
        are (made into rows on the writer's thread; the database is never waited on)."""
        if self._log is None:
            return
        self._log.record(Answered(
            ts=datetime.datetime.now(datetime.timezone.utc), request_id=request_id, model_name=model.name,
            model_version=model.version, route=route or model.alias or "pinned", endpoint=endpoint,
            customer_ids=ids, probability=np.asarray(proba, dtype=np.float64), label=np.asarray(labels),
            contact=None if decided is None else decided[1], expected_value=None if decided is None else decided[0],
            X=X, latency_ms=latency_ms))

    def _close_timeout_s(self) -> float:
        """How long the log's loader may load what is left as the replica stops."""
        return max(5.0, float(self._settings.get("shutdown_grace_s") or 0))

    def __del__(self):
        """Serve calls this when the replica stops: the alias poll ends, the log's queue is flushed
        (into the database, or the spool when it is down)."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        if getattr(self, "_log", None) is not None:
            counts = self._log.close(timeout=self._close_timeout_s())
            logger.info("churn: prediction log closed: %s", counts)
            self._log = None

    # Endpoints ---------------------------------------------------------------------------

    @app.post("/predict", summary="P(churn) and label per record",
              responses=_answers(PredictAnswer, "P(churn) and label: an object for one record, a list for a list"))
    async def predict(self, request: Request):
        try:
            parsed = await self._records(request)
            model = self._ready_model()
            route = self._route  # one read: the rollout and its challenger as they are now
            request_id = self._request_id(request)
            groups = [(model, None)]
            if route is not None and route[0].mode == "canary":
                groups = self._canary(route, model, parsed.ids, request_id)
            done, matrix = [], []
            for m, idx in groups:
                if m is model:
                    done.append(await self._answer(m, parsed, idx, request_id, matrix))
                else:
                    done.append(await self._answer_canary(route, model, parsed, idx, request_id))
        except RequestError as exc:
            return self._error(exc)
        if len(done) == 1:
            answers = done[0]
        else:  # canary: each record's answer in its place
            answers = [None] * len(parsed.records)
            for (_, idx), part in zip(groups, done):
                for i, a in zip(idx, part):
                    answers[i] = a
        if route is not None and route[0].mode == "shadow":
            same = self._same_features(model, route[1])
            self._shadow(route[1], parsed.records, parsed.ids, request_id, matrix[0] if same and matrix else None)
        return _json(answers[0] if parsed.single else answers)

    @staticmethod
    def _canary(route: tuple[Rollout, LoadedVersion], champion: LoadedVersion, ids: list,
                request_id: str) -> list[tuple[LoadedVersion, Optional[list[int]]]]:
        """Who answers which records: the challenger those whose customer id (else the request id)
        hashes below the share; -> (model, record indices; None: all) per model that answers."""
        rollout, challenger = route
        mine = [rollout.challenger_answers(request_id if cid is None else cid) for cid in ids]
        if not any(mine):
            return [(champion, None)]
        if all(mine):
            return [(challenger, None)]
        return [(champion, [i for i, m in enumerate(mine) if not m]), (challenger, [i for i, m in enumerate(mine) if m])]

    async def _answer(self, model: LoadedVersion, parsed: Any, idx: Optional[list[int]],
                      request_id: str, matrix: Optional[list] = None) -> list[dict[str, Any]]:
        """Score the records ``idx`` (None: all) with ``model``; record them -> their answers
        (``matrix``: a list that receives the model matrix, for a shadow of the same features)."""
        records = parsed.records if idx is None else [parsed.records[i] for i in idx]
        ids = parsed.ids if idx is None else [parsed.ids[i] for i in idx]
        started = time.perf_counter()
        X = self._matrix(model, records)
        if len(records) == 1:
            proba = np.array([await self._score_one((model, X))], dtype=np.float32)
        else:
            proba = model.predictor.score(X)
        latency_ms = (time.perf_counter() - started) * 1000.0
        labels = self._labels(model, proba, "predict", started)
        answers = []
        for i, p in enumerate(proba):
            a = {"churn_probability": float(p), "churn_label": int(labels[i]),
                 "model_name": model.name, "model_version": model.version}
            if ids[i] is not None:
                a["customer_id"] = ids[i]
            answers.append(a)
        decided = self._decide(model, answers, proba)
        self._observe(model, X, proba)
        self._record(request_id, model, "predict", ids, X, proba, labels, decided, latency_ms)
        if matrix is not None:
            matrix.append(X)
        return answers

    async def _answer_canary(self, route: tuple[Rollout, LoadedVersion], champion: LoadedVersion, parsed: Any,
                             idx: Optional[list[int]], request_id: str) -> list[dict[str, Any]]:
        """The challenger answers its share; when it raises (whatever the reason), the champion
        answers those records instead: a customer never gets an error from a canary."""
        challenger = route[1]
        try:
            answers = await self._answer(challenger, parsed, idx, request_id)
        except Exception as exc:  # noqa: BLE001 - counted and said once; the champion answers
            message = f"canary: challenger version {challenger.version} failed: {one_line(exc)}"
            if message != self._challenger_error:
                logger.error("churn: %s; the champion answered", message)
            self._challenger_error = message
            self._challenger_requests.inc(1, tags={"model_version": challenger.version, "mode": "canary",
                                                   "outcome": "fell_back"})
            return await self._answer(champion, parsed, idx, request_id)
        self._challenger_requests.inc(1, tags={"model_version": challenger.version, "mode": "canary",
                                               "outcome": "answered"})
        return answers

    def _same_features(self, champion: LoadedVersion, challenger: LoadedVersion) -> bool:
        """Whether both read the same model matrix (then the shadow scores the champion's)."""
        key = (id(champion), id(challenger))
        same = self._same_spec.get(key)
        if same is None:
            same = champion.predictor.spec.to_dict() == challenger.predictor.spec.to_dict()
            self._same_spec = {key: same}  # one pair at a time: the current one
        return same

    def _shadow(self, challenger: LoadedVersion, records: list[dict], ids: list, request_id: str,
                X: Optional[np.ndarray] = None) -> None:
        """Shadow mode: queue the request for the challenger, which scores it after the answer is
        made, on a thread of its own; at most ``rollout.shadow_queue`` requests wait (more: skipped
        and counted), so a slow or failing challenger never holds an answer or memory."""
        with self._shadow_lock:
            waiting = len(self._shadow_jobs)
            full = waiting >= int(self._settings.get("shadow_queue") or 256)
            if not full:
                self._shadow_jobs.append((challenger, records, ids, request_id, X))
        if full:
            self._challenger_requests.inc(1, tags={"model_version": challenger.version, "mode": "shadow",
                                                  "outcome": "skipped"})
        elif waiting == 0:  # the thread is woken once per batch, not per request
            self._shadow_ready.set()

    def _shadow_loop(self) -> None:
        """Take every queued request, score them together (one matrix, one predict call per
        challenger) and record each under its own request id, route ``shadow``."""
        while True:
            self._shadow_ready.wait(1.0)
            self._shadow_ready.clear()
            time.sleep(_SHADOW_GATHER_S)  # let requests gather: one predict call for many of them
            with self._shadow_lock:
                jobs, self._shadow_jobs = self._shadow_jobs, []
            if not jobs:
                continue
            groups: dict[int, list] = {}
            for job in jobs:
                groups.setdefault(id(job[0]), []).append(job)
            for group in groups.values():
                try:
                    self._shadow_score(group)
                except Exception:  # noqa: BLE001 - the thread must never die
                    logger.exception("churn: shadow scoring failed")

    def _shadow_score(self, jobs: list[tuple[LoadedVersion, list[dict], list, str, Optional[np.ndarray]]]) -> None:
        challenger = jobs[0][0]
        try:
            started = time.perf_counter()
            if all(job[4] is not None for job in jobs):  # the same features: the champion's matrices
                X = np.vstack([job[4] for job in jobs])
            else:
                X = to_matrix([r for job in jobs for r in job[1]], challenger.predictor.spec)
            proba = challenger.predictor.score(X)
            latency_ms = (time.perf_counter() - started) * 1000.0  # the model time of the batch it was in
            labels = (proba >= self._threshold(challenger)).astype(int)
            decided = self._decide(challenger, [{} for _ in range(len(proba))], proba)
            at = 0
            for _, records, ids, request_id, _ in jobs:
                part = slice(at, at + len(records))
                at += len(records)
                self._record(request_id, challenger, "predict", ids, X[part], proba[part], labels[part],
                             None if decided is None else (decided[0][part], decided[1][part]), latency_ms, "shadow")
            outcome = "scored"
        except Exception as exc:  # noqa: BLE001 - the challenger's failure is counted, never answered
            outcome = "failed"
            message = f"shadow: challenger version {challenger.version} failed: {one_line(exc)}"
            if message != self._challenger_error:
                logger.error("churn: %s", message)
            self._challenger_error = message
        self._challenger_requests.inc(len(jobs), tags={"model_version": challenger.version, "mode": "shadow",
                                                       "outcome": outcome})

    @app.post("/explain", summary="SHAP contributions per raw feature",
              responses=_answers(ExplainAnswer, "P(churn) with its SHAP contributions and top reasons"))
    async def explain_records(self, request: Request):
        try:
            body = await self._body(request)
        except RequestError as exc:
            return self._error(exc)
        # Everything after the read runs on the explain thread: validating thousands of records,
        # building their matrix and writing their answers hold the GIL for as long as SHAP itself,
        # and on the event loop they would hold up every /predict behind them.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._explain_pool, self._explain_body, body, request)

    def _explain_body(self, body: bytes, request: Request) -> Response:
        try:
            parsed = self._validator.parse(body, self._validator.limits.max_explain_records,
                                           "serve.max_explain_records")
            model = self._ready_model()
            started = time.perf_counter()
            X = self._matrix(model, parsed.records)
        except RequestError as exc:
            return self._error(exc)
        answers = self._explain(model, X, parsed.ids, started, request)
        return _json(answers[0] if parsed.single else answers)

    def _describe_rollout(self) -> Optional[dict[str, Any]]:
        """The rollout this replica follows: mode, share, the challenger; or its last error."""
        route = self._route
        error = self._rollout_error or self._challenger_error
        if route is None:
            return {"error": error} if error else None
        rollout, challenger = route
        return {"mode": rollout.mode, "share": rollout.share if rollout.mode == "canary" else None,
                "challenger_version": challenger.version, "started_at": rollout.started_at,
                "error": error}

    @app.get("/healthz", summary="ready / degraded / not_ready",
             responses={200: {"model": Health, "description": "a model is loaded (ready, or degraded: still serving)"},
                        503: {"model": Health, "description": "no model loaded yet"}})
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
            "rollout": self._describe_rollout(),
        }
        if model is None:
            body["reason"] = self._reason
        return JSONResponse(body, status_code=code)

    @app.get("/model", summary="the model that answers",
             responses={200: {"model": ModelInfo, "description": "the version answering now"}, 503: ERRORS[503]})
    def model_info(self):
        model = self._model
        if model is None:
            return JSONResponse({"detail": self._reason or "no model loaded"}, status_code=503)
        decision = self._decision(model)
        cut = self._contact_threshold(model)
        return {**model.describe(), "decision_threshold": self._threshold(model),
                "decision": None if decision is None else {
                    "value_saved": decision.value_saved, "contact_cost": decision.contact_cost,
                    "save_rate": decision.save_rate, "break_even": decision.break_even,
                    "contact_threshold": cut if math.isfinite(cut) else None,
                    "threshold_source": ("fixed" if (self._settings.get("decision") or {}).get("threshold") is not None
                                         else (model.predictor.meta.get("decision") or {}).get("threshold_source"))},
                "calibration": cal.describe() if (cal := model.predictor.calibrator) is not None else "none",
                "source": self._loader.describe(), "rollout": self._describe_rollout()}

    @app.get("/metrics", summary="Prometheus metrics of this node (text format)",
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format: churn_* "
                              "(predictions by version and label, model latency) and Ray Serve's ray_serve_*"},
                        503: ERRORS[503]})
    def metrics(self):
        """Ray's metrics of the node this replica runs on, on the Serve port where people look
        (Ray exports them on a per-node port of its own, printed nowhere)."""
        import requests

        try:
            if self._metrics_url is None:
                self._metrics_url = _node_metrics_url()
            answer = requests.get(self._metrics_url, timeout=10)
            answer.raise_for_status()
        except Exception as exc:  # noqa: BLE001 - the agent restarting, a node without metrics
            self._metrics_url = None
            return JSONResponse({"detail": f"Ray's metrics agent did not answer: {one_line(exc)}"}, status_code=503)
        return Response(answer.content, media_type=answer.headers.get("content-type", "text/plain; version=0.0.4"))

    @app.get("/docs", include_in_schema=False)
    def docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="openapi.json", title="Churn prediction - API",
                                   swagger_js_url="docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="docs/assets/swagger-ui.css",
                                   swagger_favicon_url="docs/assets/favicon.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(self, name: str):
        return _asset(name)


def settings_from_config(cfg: Config, api_key_sha256: Union[str, None] = None) -> dict[str, Any]:
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
        "max_explain_records": s.max_explain_records,
        "max_body_bytes": s.max_body_bytes,
        "unknown_fields": s.unknown_fields,
        "top_reasons": s.top_reasons,
        "decision_threshold": cfg.model.decision_threshold,
        "decision": {**{k: getattr(cfg.decision, k) for k in ("value_saved", "contact_cost", "save_rate")},
                     "threshold": cfg.decision.fixed_threshold},
        "gpus": s.gpus_per_replica,
        # what the API docs show of the schema: each column's meaning and unit, one real record
        "docs": {"descriptions": dict(cfg.features.descriptions), "example": cfg.features.example},
        # only a hash of the key travels in the deployment's arguments
        "api_key_sha256": api_key_sha256,
        # the prediction log: where every answer is recorded (None: not recorded)
        "log": {"uri": cfg.log_uri, "spool_dir": str(cfg.spool_path), "batch_rows": cfg.monitoring.batch_rows,
                "flush_interval_s": cfg.monitoring.flush_interval_s, "queue_max": cfg.monitoring.queue_max,
                "retry_s": cfg.monitoring.retry_s} if cfg.monitoring.log_serving else None,
        "shutdown_grace_s": s.shutdown_grace_s,
        # a rollout's shadow scoring: requests waiting for the challenger at most
        "shadow_queue": cfg.rollout.shadow_queue,
        # live drift on /metrics: the replica's last rows against the training profile
        "live": {"rows": cfg.monitoring.live_window_rows, "interval_s": cfg.monitoring.live_interval_s,
                 "psi_moderate": cfg.drift.psi_moderate, "psi_major": cfg.drift.psi_major},
    }


def build_app(args: Union[dict[str, Any], None] = None):
    """Application builder: ``serve deploy`` (``import_path: serve.app:build_app``) and ``churn serve``.

    ``args``: ``config`` (YAML file(s)), ``set`` (``key=value`` overrides),
    ``alias``, ``replicas``, ``model_uri`` (serve one fixed model instead of
    following an alias), ``api_key_sha256`` and, from Python, ``loader`` (any
    object with ``current``/``load``/``describe``/``follows_alias``; tests pass
    a ``UriLoader`` of a small real model).
    """
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
    actor_options: dict[str, Any] = {"num_cpus": cfg.serve.cpus_per_replica}
    if cfg.serve.gpus_per_replica:
        actor_options["num_gpus"] = cfg.serve.gpus_per_replica
    return ChurnService.options(
        num_replicas=int(args.get("replicas") or cfg.serve.replicas),
        max_ongoing_requests=cfg.serve.max_ongoing_requests,
        ray_actor_options=actor_options,
        logging_config={"enable_access_log": cfg.serve.access_log},
    ).bind(loader, settings, FeatureSpec.from_config(cfg.features).to_dict())
