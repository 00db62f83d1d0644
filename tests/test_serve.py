"""Ray Serve on the session's Ray instance with small real models: every endpoint, every 4xx,
the alias moving under a stream of requests, a version that fails to load, no champion at
start, the API key, Prometheus metrics, serve/config.yaml and `churn serve`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import requests
import yaml

from churnlib.data.generation import generate, iter_chunks
from churnlib.model.loading import load
from churnlib.registry.registry import Registry
from churnlib.serving.haproxy import use_high_throughput
from tests.conftest import REPO, free_port, log_local_model, make_config, run_cli

QUIET = {"say": lambda m: None}
# Replicas share the session's 2 CPUs with everything else.
SERVE_TEST = {"serve.cpus_per_replica": 0.25, "serve.poll_interval_s": 0.5, "serve.max_records": 50,
              "serve.max_explain_records": 20, "serve.max_body_bytes": 65536}


@pytest.fixture(scope="module")
def http(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def lab(ray_session, tmp_path_factory):
    ws = tmp_path_factory.mktemp("serve")
    cfg = make_config(ws)
    data = generate(4000, ws / "train.parquet", seed=9)
    runs = {
        # a: calibrated (Platt) with its cut chosen on its validation rows, as `churn train` logs it
        "a": log_local_model(cfg, data, rounds=30, run_name="a", calibrate=True, max_depth=4),
        "b": log_local_model(cfg, data, rounds=8, run_name="b", max_depth=2),
    }
    mlflow.set_tracking_uri(cfg.tracking_uri)

    class NotAChurnModel(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run(run_name="broken") as run:
        mlflow.pyfunc.log_model(name="model", python_model=NotAChurnModel())
    runs["broken"] = run.info.run_id
    records = next(iter_chunks(40, seed=21, chunk_rows=40))
    return {"ws": ws, "cfg": cfg, "runs": runs, "records": records}


def overrides(lab, **extra) -> list[str]:
    values = {"workspace": str(lab["ws"] / ".churn"), **SERVE_TEST, **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def deploy(http):
    """Deploy an app under its own route prefix; deleted after the test."""
    from ray import serve

    from serve.app import build_app

    names = []

    def _deploy(name: str, args: dict) -> str:
        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        names.append(name)
        return f"{http}/{name}"

    yield _deploy
    for name in names:
        serve.delete(name)


def raw(lab, i: int = 0) -> dict:
    rec = lab["records"].drop(columns=["Churn"]).iloc[i].to_dict()
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}


@pytest.fixture(scope="module")
def pinned(lab, http):
    """Model `a` served by a UriLoader (injected): no registry involved. One app for the module."""
    from ray import serve

    from serve.app import UriLoader, build_app

    loader = UriLoader(f"runs:/{lab['runs']['a']}/model", lab["cfg"].tracking_uri)
    serve.run(build_app({"set": overrides(lab), "loader": loader}), name="pinned", route_prefix="/pinned")
    yield f"{http}/pinned"
    serve.delete("pinned")


def test_predict_single_and_list_match_the_pyfunc(lab, pinned):
    records = [raw(lab, i) for i in range(10)]
    expected = mlflow.pyfunc.load_model(f"runs:/{lab['runs']['a']}/model").predict(lab["records"].head(10))
    one = requests.post(f"{pinned}/predict", json=records[0], timeout=30)
    assert one.status_code == 200
    body = one.json()
    assert body["churn_probability"] == pytest.approx(expected["churn_probability"].iloc[0], rel=1e-6)
    assert body["churn_label"] == int(expected["churn_label"].iloc[0])
    assert body["customer_id"] == records[0]["CustomerID"] and body["model_name"] == "xgboost_churn"
    many = requests.post(f"{pinned}/predict", json=records, timeout=30).json()
    assert [a["churn_probability"] for a in many] == pytest.approx(expected["churn_probability"].tolist(), rel=1e-6)
    # the decision: the same expected value and contact as the pyfunc (and batch scoring) for each record
    assert [a["expected_value"] for a in many] == pytest.approx(expected["expected_value"].tolist(), rel=1e-5)
    assert [a["contact"] for a in many] == expected["contact"].tolist() and any(a["contact"] for a in many)
    assert [a["customer_id"] for a in many] == [r["CustomerID"] for r in records]
    # the id is optional; a missing value (null) is fine
    no_id = {k: v for k, v in records[1].items() if k != "CustomerID"}
    no_id["Age"] = None
    res = requests.post(f"{pinned}/predict", json=no_id, timeout=30).json()
    assert "customer_id" not in res and 0 <= res["churn_probability"] <= 1


def test_concurrent_single_records_are_batched_and_correct(lab, pinned):
    from concurrent.futures import ThreadPoolExecutor

    records = [raw(lab, i) for i in range(40)]
    expected = mlflow.pyfunc.load_model(f"runs:/{lab['runs']['a']}/model").predict(lab["records"])
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: requests.post(f"{pinned}/predict", json=r, timeout=60).json(), records))
    got = {a["customer_id"]: a["churn_probability"] for a in answers}
    for rec, p in zip(records, expected["churn_probability"]):
        assert got[rec["CustomerID"]] == pytest.approx(p, rel=1e-6)


def test_every_answer_is_recorded_in_the_prediction_log(lab, pinned):
    """25 single records, a list of 15 and an explanation of 3: 43 rows in the log (SQLite in the
    workspace), each with its request id, the version that answered, the route, the probability
    and the decision answered, and the record as the model saw it."""
    import numpy as np
    import sqlalchemy as sa

    from churnlib.data.features import to_matrix
    from churnlib.predlog.schema import decode_features, predictions
    from churnlib.predlog.store import LogStore

    tag = uuid.uuid4().hex[:8]
    answers: dict[str, list[dict]] = {}
    sent: dict[str, list[dict]] = {}
    for i in range(25):
        rid = f"{tag}-one-{i}"
        sent[rid] = [raw(lab, i)]
        answers[rid] = [requests.post(f"{pinned}/predict", json=sent[rid][0], timeout=30,
                                      headers={"X-Request-ID": rid}).json()]
    rid = f"{tag}-list"
    sent[rid] = [raw(lab, i) for i in range(15, 30)]
    answers[rid] = requests.post(f"{pinned}/predict", json=sent[rid], timeout=30, headers={"X-Request-ID": rid}).json()
    rid = f"{tag}-explain"
    sent[rid] = [raw(lab, i) for i in range(3)]
    answers[rid] = requests.post(f"{pinned}/explain", json=sent[rid], timeout=60, headers={"X-Request-ID": rid}).json()
    store = LogStore(make_config(lab["ws"]).log_uri)

    def logged() -> list:
        if store.version() is None:  # the replica's writer has not migrated the log yet
            return []
        with store.engine.connect() as conn:
            return conn.execute(sa.select(predictions).where(predictions.c.request_id.like(f"{tag}-%"))
                                .order_by(predictions.c.id)).mappings().all()

    _wait(lambda: len(logged()) == 43, 30)
    rows = logged()
    assert len(rows) == 43 and len({r["prediction_id"] for r in rows}) == 43
    by_request: dict[str, list] = {}
    for r in rows:
        by_request.setdefault(r["request_id"], []).append(r)
    assert set(by_request) == set(sent)
    spec = load(f"runs:/{lab['runs']['a']}/model").predictor.spec
    for rid, got in by_request.items():
        X = to_matrix(sent[rid], spec)  # what the model saw, recorded as it saw it
        np.testing.assert_array_equal(decode_features([r["features"] for r in got], len(spec.feature_names)), X)
        for row, answer, record in zip(got, answers[rid], sent[rid]):
            assert row["model_name"] == answer["model_name"] and row["model_version"] == answer["model_version"]
            assert row["route"] == "pinned" and row["endpoint"] == ("explain" if rid.endswith("explain") else "predict")
            assert row["probability"] == answer["churn_probability"] and row["label"] == answer["churn_label"]
            assert row["contact"] == answer["contact"] and row["expected_value"] == pytest.approx(answer["expected_value"])
            assert row["customer_id"] == str(record["CustomerID"])
    store.close()


def test_a_replica_that_stops_flushes_its_log_queue(lab, http):
    """Rows still queued when the app is deleted (a 60 s flush interval holds them) reach the log as
    the replica stops: Serve calls the deployment's __del__, which drains the writer."""
    import sqlalchemy as sa
    from ray import serve

    from churnlib.predlog.schema import predictions
    from churnlib.predlog.store import LogStore
    from serve.app import UriLoader, build_app

    tag = uuid.uuid4().hex[:8]
    loader = UriLoader(f"runs:/{lab['runs']['a']}/model", lab["cfg"].tracking_uri)
    args = {"set": overrides(lab, **{"monitoring.flush_interval_s": 60, "monitoring.batch_rows": 100000}),
            "loader": loader}
    serve.run(build_app(args), name="flush", route_prefix="/flush")
    for i in range(20):
        assert requests.post(f"{http}/flush/predict", json=raw(lab, i), timeout=30,
                             headers={"X-Request-ID": f"{tag}-{i}"}).status_code == 200
    store = LogStore(make_config(lab["ws"]).log_uri)

    def count() -> int:
        if store.version() is None:
            return 0
        with store.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(predictions)
                                .where(predictions.c.request_id.like(f"{tag}-%"))).scalar()

    assert count() == 0  # still on the replica's queue
    serve.delete("flush")
    assert count() == 20
    store.close()


def test_a_database_outage_under_load_fails_no_request_and_loses_no_record(lab, http, postgres_db):
    """The prediction log on PostgreSQL, cut for 5 s (a TCP forwarder dropped and restored) while
    8 clients send 50-record requests: every request is answered, the records answered during
    the outage are spooled and replayed, and the log holds every record answered, once."""
    import psycopg
    import sqlalchemy as sa
    from ray import serve

    from churnlib.predlog.schema import predictions
    from churnlib.predlog.store import LogStore
    from serve.app import UriLoader, build_app
    from tests.conftest import Forwarder

    name = f"serve_log_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    forwarder = Forwarder(("127.0.0.1", 5432))
    tag = uuid.uuid4().hex[:8]
    loader = UriLoader(f"runs:/{lab['runs']['a']}/model", lab["cfg"].tracking_uri)
    args = {"set": overrides(lab, **{"monitoring.log_uri": f"postgresql://postgres@127.0.0.1:{forwarder.port}/{name}",
                                     "monitoring.retry_s": 0.5, "monitoring.flush_interval_s": 0.2}),
            "loader": loader}
    serve.run(build_app(args), name="pglog", route_prefix="/pglog")
    try:
        load = Load(f"{http}/pglog", [raw(lab, i % 40) for i in range(50)], clients=8,
                    headers={"X-Request-ID": tag}).start()
        forwarder.cut()
        time.sleep(5)
        forwarder.restore()
        time.sleep(2)
        load.stop()
        assert load.dropped == [] and load.ok > 20
        store = LogStore(f"postgresql://postgres@127.0.0.1:5432/{name}")

        def logged() -> list:
            try:
                with store.engine.connect() as conn:
                    return conn.execute(sa.select(predictions.c.prediction_id)
                                        .where(predictions.c.request_id == tag)).scalars().all()
            except sa.exc.ProgrammingError:  # no table yet: the writers, cut off before their first
                return []                    # write (a busy machine), migrate when they get through

        _wait(lambda: len(logged()) >= 50 * load.ok, 60)
        ids = logged()
        assert len(ids) == len(set(ids)) == 50 * load.ok
        store.close()

        def counted(kind: str) -> float:  # the writer's own counts, on /metrics
            text = requests.get(f"{http}/pglog/metrics", timeout=10).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("ray_churn_prediction_log_rows_total{") and f'kind="{kind}"' in line
                       and 'application="pglog"' in line)

        _wait(lambda: counted("replayed") > 0, 30)  # the outage did spool, and the spool was replayed
        assert counted("spooled") > 0 and counted("dropped") == 0
    finally:
        serve.delete("pglog")
        forwarder.cut()
        with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                             autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_explain_is_additive_and_sorted(lab, pinned):
    records = [raw(lab, i) for i in range(5)]
    answers = requests.post(f"{pinned}/explain", json=records, timeout=30).json()
    # the model is Platt-calibrated: its SHAP values are rescaled to the calibrated log-odds, so
    # they add up to the probability /predict answers
    predicted = requests.post(f"{pinned}/predict", json=records, timeout=30).json()
    assert [a["churn_probability"] for a in answers] == [p["churn_probability"] for p in predicted]
    for a, rec in zip(answers, records):
        assert a["units"] == "log-odds"
        margin = a["base_value"] + sum(a["contributions"].values())
        assert 1 / (1 + math.exp(-margin)) == pytest.approx(a["churn_probability"], abs=1e-5)
        assert set(a["contributions"]) == set(lab["cfg"].features.numeric) | set(lab["cfg"].features.categorical)
        sizes = [abs(r["contribution"]) for r in a["top_reasons"]]
        assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True)
        for reason in a["top_reasons"]:  # raw values: category strings, not codes
            assert reason["value"] == rec[reason["feature"]] or reason["value"] == pytest.approx(rec[reason["feature"]])
    single = requests.post(f"{pinned}/explain", json=records[0], timeout=30).json()
    assert single["contributions"] == pytest.approx(answers[0]["contributions"])


def test_model_healthz_and_docs(lab, pinned):
    info = requests.get(f"{pinned}/model", timeout=30).json()
    assert info["run_id"] == lab["runs"]["a"] and info["decision_threshold"] == 0.5 and info["loaded_at"]
    # the model's calibration and the cut chosen on its validation rows
    meta = load(f"runs:/{lab['runs']['a']}/model").predictor.meta
    assert info["decision"] == {"value_saved": 500.0, "contact_cost": 25.0, "save_rate": 0.25, "break_even": 0.2,
                                "contact_threshold": meta["decision"]["threshold"], "threshold_source": "auto"}
    assert 0 < info["decision"]["contact_threshold"] < 1
    cal = meta["calibration"]
    assert info["calibration"] == f"platt (P = sigmoid({cal['a']:.4f} x margin {cal['b']:+.4f}), {cal['rows']} rows)"
    health = requests.get(f"{pinned}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    spec = requests.get(f"{pinned}/openapi.json", timeout=30).json()
    assert {"/predict", "/explain", "/healthz", "/model"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["anyOf"][0] == {"$ref": "#/components/schemas/CustomerRecord"}
    record = spec["components"]["schemas"]["CustomerRecord"]
    assert "Contract Length" in record["properties"]
    # the column's own name as title (issue: "Customerid"), its meaning and unit from the config
    assert record["properties"]["CustomerID"]["title"] == "CustomerID"
    assert record["properties"]["Tenure"]["description"] == "time as a customer, months"
    # a real customer as the example (issue: zeros and "string"), valid for the endpoint itself
    example = body["examples"]["one"]["value"]
    assert example == lab["cfg"].features.example and example["Age"] == 41
    answer = requests.post(f"{pinned}/predict", json=example, timeout=30)
    assert answer.status_code == 200 and answer.json()["customer_id"] == 2
    # every endpoint documents its answer: response models, not "string" (issue)
    for path, method, model in (("/predict", "post", "PredictAnswer"), ("/explain", "post", "ExplainAnswer"),
                                ("/healthz", "get", "Health"), ("/model", "get", "ModelInfo")):
        ok = json.dumps(spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"])
        assert f"#/components/schemas/{model}" in ok, path
        assert spec["components"]["schemas"][model]["properties"], model
    # the error answers are documented with their bodies (issue: only 200 was)
    for path in ("/predict", "/explain"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "401", "413", "422", "503"} <= set(responses), path
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    # Swagger UI with no internet (issue: its assets came from a CDN): every asset from this server
    page = requests.get(f"{pinned}/docs", timeout=30)
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert not re.findall(r"(?:src|href)=['\"]?(?:https?:)?//", page.text), page.text
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css")):
        res = requests.get(f"{pinned}/docs/assets/{asset}", timeout=30)
        assert res.status_code == 200 and kind in res.headers["content-type"] and len(res.content) > 100_000
    assert requests.get(f"{pinned}/docs/assets/..%2Fsecrets", timeout=30).status_code == 404


def test_swagger_ui_renders_in_a_browser_with_no_network(lab, pinned, tmp_path):
    """What a person sees: headless Chromium (Debian's) with every non-local host unreachable loads
    /docs, runs Swagger UI, and shows the endpoints and the Schemas section."""
    from tests.conftest import chromium_dom

    dom = chromium_dom(f"{pinned}/docs", tmp_path, screenshot=tmp_path / "docs.png")
    assert "swagger-ui" in dom and "/predict" in dom and "/explain" in dom
    assert "Schemas" in dom and "CustomerRecord" in dom and "PredictAnswer" in dom
    assert (tmp_path / "docs.png").stat().st_size > 10_000


@pytest.mark.parametrize(("mutate", "status", "detail"), [
    (lambda r: r.pop("Tenure"), 422, "record 0, field 'Tenure': Field required"),
    (lambda r: r.update({"Age": "old"}), 422, "record 0, field 'Age': Input should be a valid number"),
    (lambda r: r.update({"Gender": "Robot"}), 422, "record 0, field 'Gender': Input should be 'Female' or 'Male'"),
    (lambda r: r.update({"Total Spend": 1e400}), 422, "record 0, field 'Total Spend': Input should be a finite number"),
    # issue: above float32's range /explain answered 500 and /predict scored it silently
    (lambda r: r.update({"Age": 1e39}), 422, "record 0, field 'Age': out of range"),
    (lambda r: r.update({"Age": True}), 422, "record 0, field 'Age': Input should be a valid number"),
    (lambda r: r.update({"CustomerID": False}), 422, "record 0, field 'CustomerID': the customer id must be"),
    (lambda r: r.update({"Promo": "x"}), 422, "record 0, field 'Promo': unknown field"),
])
def test_bad_single_records_are_422_naming_the_field(lab, pinned, mutate, status, detail):
    rec = raw(lab)
    mutate(rec)
    body = json.dumps(rec)  # Python's json writes Infinity, as some clients do
    for endpoint in ("predict", "explain"):
        res = requests.post(f"{pinned}/{endpoint}", data=body, timeout=30)
        assert res.status_code == status and res.json()["detail"].startswith(detail), res.text


def test_bad_lists_and_bodies(lab, pinned):
    good = raw(lab)
    bad = dict(good, **{"Contract Length": "Weekly"})
    res = requests.post(f"{pinned}/predict", json=[good, good, bad], timeout=30)
    assert res.status_code == 422 and res.json()["detail"].startswith("record 2, field 'Contract Length'")
    assert res.json()["errors"][0] == {"record": 2, "field": "Contract Length", "type": "literal_error",
                                       "message": "Input should be 'Monthly', 'Quarterly' or 'Annual'"}
    res = requests.post(f"{pinned}/predict", json=[], timeout=30)
    assert res.status_code == 422 and res.json()["detail"].startswith("empty list")
    res = requests.post(f"{pinned}/predict", json=[good] * 51, timeout=30)
    assert res.status_code == 413 and "at most 50" in res.json()["detail"]
    res = requests.post(f"{pinned}/explain", json=[good] * 21, timeout=30)
    assert res.status_code == 413 and res.json()["detail"].endswith("at most 20 (serve.max_explain_records)")
    # issue: a 50 MB body with one record and a padding field was accepted; refused by its
    # Content-Length, or as it streams in when it has none
    padded = json.dumps(dict(good, Churn="x" * 100_000)).encode()
    res = requests.post(f"{pinned}/predict", data=padded, timeout=30)
    assert res.status_code == 413 and "serve.max_body_bytes" in res.json()["detail"]
    res = requests.post(f"{pinned}/predict", data=(padded[i:i + 8192] for i in range(0, len(padded), 8192)), timeout=30)
    assert res.status_code == 413
    for body in (b"{not json", b"42", b"", b'["a record?"]'):
        res = requests.post(f"{pinned}/predict", data=body, timeout=30)
        assert res.status_code == 422, body
    # nothing a client sends makes a 500
    import random

    rng = random.Random(0)
    for _ in range(30):
        rec = dict(good)
        rec[rng.choice(list(rec))] = rng.choice([None, "", [], {}, -1e308, "NaN", True, "Male", 3])
        assert requests.post(f"{pinned}/predict", json=rec, timeout=30).status_code in (200, 422)


def test_explanations_do_not_starve_predictions(lab, deploy):
    """Four large /explain requests at once, and single-record /predict calls meanwhile: the
    explanations run on their own thread, so predictions keep being answered while they run
    (issue: single predictions went from 2.8 ms to 6.6 s behind four 10,000-record explains)."""
    from concurrent.futures import ThreadPoolExecutor

    url = deploy("explain_load", {"set": overrides(lab, **{"serve.max_records": 5000, "serve.max_explain_records": 3000,
                                                            "serve.max_body_bytes": 8388608}),
                                  "loader": _uri_loader(lab)})
    big = [raw(lab, i % 40) for i in range(3000)]
    rec = raw(lab, 1)
    assert requests.post(f"{url}/predict", json=rec, timeout=30).status_code == 200
    done_explains: list[float] = []
    predicted: list[tuple[float, float]] = []  # (sent, answered)

    def explain_once(_):
        r = requests.post(f"{url}/explain", json=big, timeout=300)
        done_explains.append(time.monotonic())
        return r.status_code

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        explains = [pool.submit(explain_once, i) for i in range(4)]
        while not all(f.done() for f in explains):
            sent = time.monotonic()
            assert requests.post(f"{url}/predict", json=rec, timeout=60).status_code == 200
            predicted.append((sent, time.monotonic()))
        assert [f.result() for f in explains] == [200] * 4
    # While the explanations were still running, predictions went on answering, many of them,
    # each in a small part of the explanations' time. Starved (the explanations on the event
    # loop, queued ahead of the predictions), a prediction waits for them:
    # one in the window, waiting 93% of it (measured). Ratios, so that a loaded machine slowing
    # both does not change the verdict; the median, as one request can be held up by the machine
    # (CI: the first one, racing the four 700 kB uploads through the proxy, once took 1.8 s of a
    # 3.9 s window while 97 others took 12-50 ms; another CI run, the other test worker busy:
    # 14 answered, median 6% of the window). Here, alone: ~100 answered, median under 1%.
    window = max(done_explains) - started
    waits = sorted(b - a for a, b in predicted if b < max(done_explains))
    median = waits[len(waits) // 2] if waits else window
    assert len(waits) >= 5 and median < 0.2 * window, (len(waits), median, window, waits[-5:])


def _uri_loader(lab):
    from serve.app import UriLoader

    return UriLoader(f"runs:/{lab['runs']['a']}/model", lab["cfg"].tracking_uri)


def _registry(lab, name: str) -> Registry:
    cfg = make_config(lab["ws"], **{"model.registered_name": name})
    return Registry(cfg, **QUIET)


def test_the_alias_moves_under_a_stream_of_requests(lab, deploy):
    reg = _registry(lab, "serve_follow")
    v1, _ = reg.register(lab["runs"]["a"])
    v2, _ = reg.register(lab["runs"]["b"])
    reg.promote(v1.version, force=True)
    url = deploy("follow", {"set": overrides(lab, **{"model.registered_name": "serve_follow"})})
    rec = raw(lab, 3)
    seen: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            r = requests.post(f"{url}/predict", json=rec, timeout=30)
            seen.append((time.monotonic(), r.status_code, r.json().get("model_version")))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        reg.promote(v2.version, force=True)
        moved = time.monotonic()
        _wait(lambda: seen and seen[-1][2] == v2.version, 20)
        switched = time.monotonic()
        time.sleep(1)
        reg.rollback()
        _wait(lambda: seen[-1][2] == v1.version, 20)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(code == 200 for _, code, _ in seen), {code for _, code, _ in seen}
    versions = [v for _, _, v in seen]
    assert versions[0] == v1.version and v2.version in versions and versions[-1] == v1.version
    # followed within the wait above (20 s; the alias is polled every 0.5 s here, 10 s by
    # default): how long the new version took to load is the machine's speed, not a verdict
    print(f"switched {switched - moved:.1f} s after the alias moved")
    assert requests.get(f"{url}/model", timeout=30).json()["version"] == v1.version


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(lab, deploy):
    reg = _registry(lab, "serve_broken")
    good, _ = reg.register(lab["runs"]["a"])
    broken, _ = reg.register(lab["runs"]["broken"])
    reg.promote(good.version, force=True)
    url = deploy("broken", {"set": overrides(lab, **{"model.registered_name": "serve_broken"})})
    reg.promote(broken.version, force=True)
    _wait(lambda: requests.get(f"{url}/healthz", timeout=30).json()["status"] == "degraded", 20)
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["model"]["version"] == good.version
    assert health["last_load_error"].startswith(f"version {broken.version} failed to load: ")
    assert "not a churn model" in health["last_load_error"]
    answer = requests.post(f"{url}/predict", json=raw(lab), timeout=30)
    assert answer.status_code == 200 and answer.json()["model_version"] == good.version
    reg.rollback()  # champion back to the good version: healthy again
    _wait(lambda: requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ready", 20)


def test_no_champion_at_start_then_one_appears_then_its_decision_changes(lab, deploy):
    reg = _registry(lab, "serve_empty")
    url = deploy("empty", {"set": overrides(lab, **{"model.registered_name": "serve_empty"})})
    health = requests.get(f"{url}/healthz", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "not_ready"
    assert "has no alias 'champion'" in health.json()["reason"]
    res = requests.post(f"{url}/predict", json=raw(lab), timeout=30)
    assert res.status_code == 503 and "has no alias 'champion'" in res.json()["detail"]
    assert requests.get(f"{url}/model", timeout=30).status_code == 503
    v, _ = reg.register(lab["runs"]["b"])
    reg.promote(v.version, force=True)
    _wait(lambda: requests.get(f"{url}/healthz", timeout=30).status_code == 200, 20)
    assert requests.post(f"{url}/predict", json=raw(lab), timeout=30).json()["model_version"] == v.version
    # new costs, no new version: `churn models decide` on the champion, and the replica follows
    from churnlib.registry.decide import rederive

    rederive(make_config(lab["ws"], **{"model.registered_name": "serve_empty", "decision.contact_cost": 100.0}),
             **QUIET)
    _wait(lambda: requests.get(f"{url}/model", timeout=30).json()["decision"]["contact_cost"] == 100.0, 20)
    info = requests.get(f"{url}/model", timeout=30).json()
    assert info["version"] == v.version and info["decision"]["contact_threshold"] == pytest.approx(0.8)
    assert info["decision"]["threshold_source"] == "break-even"
    answers = requests.post(f"{url}/predict", json=[raw(lab, i) for i in range(40)], timeout=30).json()
    for a in answers:
        assert a["contact"] == (a["churn_probability"] >= 0.8)
        assert a["expected_value"] == pytest.approx(a["churn_probability"] * 0.25 * 500 - 100, rel=1e-6)


def test_api_key_guards_predict_and_explain_only(lab, deploy, monkeypatch):
    from serve.app import UriLoader

    monkeypatch.setenv("CHURN_API_KEY", "s3cret-key")
    loader = UriLoader(f"runs:/{lab['runs']['a']}/model", lab["cfg"].tracking_uri)
    url = deploy("keyed", {"set": overrides(lab), "loader": loader})
    rec = raw(lab)
    for endpoint in ("predict", "explain"):
        assert requests.post(f"{url}/{endpoint}", json=rec, timeout=30).status_code == 401
        wrong = requests.post(f"{url}/{endpoint}", json=rec, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        ok = requests.post(f"{url}/{endpoint}", json=rec, headers={"Authorization": "Bearer s3cret-key"}, timeout=30)
        assert ok.status_code == 200
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    # the key itself is not in the deployment's arguments, only its hash
    from serve.app import settings_from_config

    assert "s3cret-key" not in str(settings_from_config(lab["cfg"]))


def test_prometheus_metrics_by_version_and_label(lab, pinned):
    import ray

    for i in range(6):
        requests.post(f"{pinned}/predict", json=raw(lab, i), timeout=30)
    port = ray._private.worker.global_worker.node.metrics_export_port
    found: dict[str, list[str]] = {}

    def scrape() -> bool:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for name in ("ray_churn_predictions_total", "ray_churn_model_latency_ms_count",
                     "ray_churn_prediction_log_rows_total"):
            found[name] = [line for line in text.splitlines()
                           if line.startswith(name + "{") and 'application="pinned"' in line]
        found["serve"] = [line for line in text.splitlines() if line.startswith("ray_serve_num_http_requests_total{")]
        return all(found.values())

    _wait(scrape, 40)
    labels = " ".join(found["ray_churn_predictions_total"])
    assert 'label="1"' in labels or 'label="0"' in labels
    assert 'model_version="' in labels
    assert any('kind="written"' in line for line in found["ray_churn_prediction_log_rows_total"])
    # the same metrics on the Serve port, where people look (issue: 404 there, a random port elsewhere)
    here = requests.get(f"{pinned}/metrics", timeout=30)
    assert here.status_code == 200 and here.headers["content-type"].startswith("text/plain")
    assert any(line.startswith("ray_churn_predictions_total{") and 'application="pinned"' in line
               for line in here.text.splitlines())
    assert "ray_serve_num_http_requests_total{" in here.text


def test_live_drift_of_the_last_records_is_on_metrics(lab, deploy):
    """Traffic whose customers are 25 years older than the training table's: the replica's live
    PSI for Age crosses the major threshold on /metrics, a feature left alone stays low, and the
    score histogram of the window is there."""
    from serve.app import UriLoader

    loader = UriLoader(f"runs:/{lab['runs']['a']}/model", lab["cfg"].tracking_uri)
    url = deploy("live", {"set": overrides(lab, **{"monitoring.live_interval_s": 0.5,
                                                   "monitoring.live_window_rows": 300,
                                                   "monitoring.log_serving": False}), "loader": loader})
    traffic = next(iter_chunks(300, seed=23, chunk_rows=300)).drop(columns=["Churn"])
    traffic["Age"] = traffic["Age"] + 25
    records = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in traffic.to_dict("records")]
    for i in range(0, 300, 50):
        assert requests.post(f"{url}/predict", json=records[i:i + 50], timeout=30).status_code == 200
    found: dict[str, float] = {}

    def scrape() -> bool:
        for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith(("ray_churn_live_psi{", "ray_churn_live_score_share{")) and 'application="live"' in line:
                name = re.search(r'(?:feature|bin)="([^"]+)"', line).group(1)
                found[name] = float(line.rsplit(" ", 1)[1])
        return "Age" in found and "Tenure" in found and "0.9-1.0" in found

    _wait(scrape, 60)
    assert found["Age"] > 0.25 and found["Tenure"] < 0.1
    shares = [found[f"{i / 10:.1f}-{(i + 1) / 10:.1f}"] for i in range(10)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)


def test_serve_config_yaml_is_valid_for_serve_deploy(lab, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    doc = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    dep = app.deployments[0]
    assert dep.name == "ChurnService" and dep.autoscaling_config["max_replicas"] >= 2
    assert "MLFLOW_TRACKING_URI" not in str(doc)  # from the cluster's environment
    # the builder accepts the file's args and builds the application
    monkeypatch.setenv("CHURN_WORKSPACE", str(lab["ws"] / ".churn"))
    built = build_app(app.args)
    assert type(built).__name__ == "Application"


class Load:
    """Clients posting 50-record requests until stopped; a refused connection (the server stopped
    taking connections) is counted apart from a request that failed once sent (dropped)."""

    RETRIES = 2  # with retry_reset: a request is tried at most this many more times

    def __init__(self, url: str, body: list, clients: int = 16, headers: dict | None = None,
                 retry_reset: bool = False):
        self.url, self.body, self.headers = url, body, headers or {}
        self.ok = self.refused = 0
        self.dropped: list[str] = []
        self.failures: list[tuple[float, str]] = []  # (when the request started, what happened)
        # retry_reset: as a production client does with an idempotent request, send it once more
        # when the connection was reset or closed without an answer (not when it was refused), or
        # when the proxy answered that it had no replica for it
        self.retry_reset = retry_reset
        self.resets: list[tuple[float, str]] = []  # the requests sent again (once each), and why
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _post(self, session: requests.Session, started: float) -> requests.Response:
        # retry_reset: up to RETRIES more tries, 0.1 s apart and then 0.2 s (what urllib3's Retry
        # with a backoff does): a try sent at once can reach the dead replica again before HAProxy
        # has marked it down (seen with the machine busy with other tests)
        for attempt in range(self.RETRIES + 1):
            last = attempt == self.RETRIES
            try:
                r = session.post(f"{self.url}/predict", json=self.body, headers=self.headers, timeout=30)
                # HAProxy's own answer when it found no replica to send the request to (Serve turns
                # its 502/503/504 into this 500; the service's errors are JSON)
                if last or not (self.retry_reset and r.status_code == 500 and r.text == "Internal Server Error"):
                    return r
                what = "HTTP 500 from HAProxy"
            except requests.ConnectionError as exc:
                if last or not self.retry_reset or "refused" in str(exc) or "NewConnectionError" in str(exc):
                    raise
                what = str(exc)[:120]
            if attempt == 0:
                with self._lock:
                    self.resets.append((started, f"{what} after {time.monotonic() - started:.3f} s"))
            time.sleep(0.1 * (attempt + 1))
            session = requests.Session()
        raise AssertionError("unreachable")

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                r = self._post(session, started)
                with self._lock:
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.dropped.append(f"HTTP {r.status_code} {r.text[:80]!r} {r.headers.get('server', '')}")
                        self.failures.append((started, self.dropped[-1]))
            except requests.ConnectionError as exc:
                with self._lock:
                    if "refused" in str(exc) or "NewConnectionError" in str(exc):
                        self.refused += 1
                    else:
                        self.dropped.append(str(exc)[:120])
                        self.failures.append((started, f"{self.dropped[-1]} after {time.monotonic() - started:.3f} s"))
                session = requests.Session()
                time.sleep(0.05)

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        time.sleep(2)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _serve_args(lab, port: int) -> list:
    return ["serve", "--port", port, "--set", f"workspace={lab['ws'] / '.churn'}"]


@pytest.fixture(scope="module")
def champion(lab):
    reg = _registry(lab, "xgboost_churn_model")
    v, _ = reg.register(lab["runs"]["a"])
    reg.promote(v.version, force=True)
    return v.version


@pytest.mark.parametrize(("signame", "group"), [("SIGTERM", False), ("SIGINT", True)])
def test_churn_serve_stops_cleanly_under_load(lab, champion, signame, group):
    """SIGTERM (systemd, Docker, Kubernetes) and Ctrl-C (SIGINT to the process group) under 16
    clients: new connections refused at once, every request in flight answered, exit 0 within
    seconds, no process and no HAProxy state left (issue: exit 134 or 35 s, requests dropped,
    orphaned Ray agents, /tmp/haproxy-serve left). With an API key: only its hash reaches Ray.
    Every record answered is in the prediction log after the stop (the replicas' writers are
    flushed before the Ray instance goes: a run lost the last half second of each queue)."""
    import psutil
    import sqlalchemy as sa

    from churnlib.predlog.schema import predictions
    from churnlib.predlog.store import LogStore
    from churnlib.serving.haproxy import haproxy_binary
    from tests.conftest import alive, cli_env, signal_cli

    port = free_port()
    tag = f"stop-{signame}-{uuid.uuid4().hex[:8]}"
    key = "test-key-" + signame
    env = cli_env(CHURN_API_KEY=key)
    load: dict = {}
    checked: dict = {}

    def under_load(proc) -> None:
        url = f"http://127.0.0.1:{port}"
        assert requests.post(f"{url}/predict", json=raw(lab), timeout=30).status_code == 401
        tree = psutil.Process(proc.pid).children(recursive=True)
        # the key itself is in no process of the Ray instance (only its hash, in the app's arguments)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                assert key not in " ".join(f"{k}={v}" for k, v in p.environ().items()), p.cmdline()
        haproxies = [p for p in tree if p.name() == "haproxy"]
        if haproxy_binary():
            assert haproxies
            state = next(Path(a).parent.parent for a in haproxies[0].cmdline() if a.endswith("haproxy.cfg"))
            assert state.name.startswith("churn-serve-") and (state.stat().st_mode & 0o777) == 0o700
            sockets = list(state.glob("*/admin.sock"))
            assert sockets and all((s.stat().st_mode & 0o777) == 0o600 for s in sockets)
            # haproxy reloads by starting a new process and ending the old one: look again at the
            # ones alive until the listeners are all there (or time is up)
            deadline = time.monotonic() + 20
            while True:
                listening = set()
                for p in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                        if p.name() == "haproxy":
                            listening |= {c.laddr for c in p.net_connections("tcp") if c.status == "LISTEN"}
                if len(listening) >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert len(listening) >= 3 and all(a.ip == "127.0.0.1" for a in listening), listening
            checked["state"] = state
        if signame == "SIGINT":
            # the instance it started is where it said (issue: the dashboard's URL was printed nowhere)
            said = next(line for line in printed if line.startswith("ray: started a local instance"))
            dashboard = re.search(r"dashboard (http://127\.0\.0\.1:\d+)", said).group(1)
            assert requests.get(f"{dashboard}/api/version", timeout=30).status_code == 401  # token auth is on
            where = re.search(r"\(token: (\S+);", said).group(1)
            token = Path(os.path.expanduser(where)).read_text().strip()
            assert requests.get(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"},
                                timeout=30).status_code == 200
            status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address",
                                     re.search(r"`ray status --address (\S+)`", said).group(1)],
                                    capture_output=True, text=True, timeout=60, env=cli_env())
            assert status.returncode == 0 and "Resources" in status.stdout, status.stderr[-1000:]
        load["load"] = Load(url, [raw(lab, i % 40) for i in range(50)],
                            headers={"Authorization": f"Bearer {key}", "X-Request-ID": tag}).start()

    printed: list[str] = []
    try:
        rc, err, took, tree = signal_cli(_serve_args(lab, port), "serve: xgboost_churn_model version", getattr(signal, signame),
                                         group, lab["ws"], env=env, timeout=240, on_start=under_load, lines=printed)
    finally:
        if "load" in load:
            time.sleep(1)
            load["load"].stop()
    traffic = load["load"]
    assert rc == 0, err[-3000:]
    assert traffic.dropped == [] and traffic.ok > 10 and traffic.refused > 0
    assert took < 15
    assert "serve: stopped in" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert alive(tree) == []
    if "state" in checked:
        assert not checked["state"].exists()
    store = LogStore(make_config(lab["ws"]).log_uri)
    with store.engine.connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                              .where(predictions.c.request_id == tag)).scalar()
    store.close()
    from churnlib.predlog.writer import spooled_rows
    assert logged == 50 * traffic.ok, (logged, 50 * traffic.ok, spooled_rows(make_config(lab["ws"]).spool_path),
                                       err[-2000:])


def test_a_killed_replica_loses_no_request(lab, champion):
    """SIGKILL one of two replicas under 8 clients that send a request once more when its
    connection is reset or the proxy had no replica for it (as production clients do with an
    idempotent POST): nothing is lost (issue: 17 lost). HAProxy replays what reaches the dead
    replica, so the clients see at most the requests in flight at the instant it died (0-2 here;
    CI once saw two requests sent a few ms after the kill call was made, still in flight when
    the replica died). The stop afterwards is clean."""
    import psutil

    from churnlib.serving.haproxy import haproxy_binary
    from tests.conftest import signal_cli

    if not haproxy_binary():
        pytest.skip("the retry is HAProxy's (high-throughput mode); the Python proxy does not replay")
    port = free_port()
    load: dict = {}

    def replicas_of(proc) -> list:
        found = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "ServeReplica" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def kill_a_replica(proc) -> None:
        url = f"http://127.0.0.1:{port}"
        load["load"] = Load(url, [raw(lab, i) for i in range(10)], clients=8, retry_reset=True).start()
        replicas = replicas_of(proc)
        assert len(replicas) == 2
        before = load["load"].ok
        load["killed_at"] = time.monotonic()
        replicas[0].kill()
        _wait(lambda: load["load"].ok > before + 200, 60)  # served on, by the other replica (and the restarted one)
        _wait(lambda: len(replicas_of(proc)) == 2, 60)  # the replica Serve started in its place
        time.sleep(3)  # ... and traffic on it, after HAProxy's reload
        load["load"].stop()

    try:
        rc, err, _, _ = signal_cli([*_serve_args(lab, port), "--replicas", 2], "serve: xgboost_churn_model version",
                                   signal.SIGTERM, False, lab["ws"], timeout=240, on_start=kill_a_replica)
    finally:
        if "load" in load:
            load["load"].stop()
    assert rc == 0, err[-3000:]
    traffic = load["load"]
    when = [(round(t - load["killed_at"], 3), what) for t, what in traffic.failures + traffic.resets]
    assert traffic.failures == [] and traffic.refused == 0, when[:5]  # the load stopped before the server
    # at most the requests in flight at the kill, one per client (without HAProxy's replay, every
    # request sent to the dead replica until it is marked down fails: 17 here before)
    assert len(traffic.resets) <= 8, when[:5]
    assert traffic.ok > 200
    print(f"resets: {len(traffic.resets)}: {when[:10]}")


def test_churn_serve_exits_when_its_ray_instance_dies(lab, champion):
    """The raylet under `churn serve` is killed: within seconds one line, exit 1, the port free,
    nothing left running (issue: 500s for ~60 s and an orphaned HAProxy holding the port)."""
    import socket

    import psutil

    from tests.conftest import alive, signal_cli

    port = free_port()

    state: list[str] = []

    def kill_raylet(proc) -> None:
        raylet = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "raylet"]
        assert raylet
        # this server's private HAProxy folder (another test's server may have one at the same time)
        state.append(raylet[0].environ()["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        raylet[0].kill()
        time.sleep(0.2)

    # the signal sent after the raylet's death is a 0 (a liveness probe), so only the death acts
    rc, err, took, tree = signal_cli(_serve_args(lab, port), "serve: xgboost_churn_model version", 0, False,
                                     lab["ws"], timeout=240, on_start=kill_raylet)
    assert rc == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"error: serve: the Ray instance under the server stopped (raylet exited "
                                            f"with -9); port {port} freed")
    assert took < 15
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds it (TIME_WAIT is no owner)
        s.bind(("127.0.0.1", port))  # free
    assert alive(tree) == []
    assert state and state[0].startswith(str(Path(tempfile.gettempdir()) / "churn-serve-"))
    assert not Path(state[0]).exists()  # its HAProxy state folder is removed


def test_churn_serve_refuses_a_busy_port(lab):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_cli("serve", "--port", str(port), "--set", f"workspace={lab['ws'] / '.churn'}", cwd=lab["ws"])
    assert res.returncode == 1 and res.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use; choose another with --port"


def _ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (requests.RequestException, IndexError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")


def test_high_throughput_mode_selection(lab, monkeypatch):
    """serve.high_throughput: auto follows the HAProxy binary; on without one is a config error."""
    import ray

    from churnlib.errors import ConfigError

    cfg = lambda mode, **kw: make_config(lab["ws"], **{"serve.high_throughput": mode, **kw})  # noqa: E731
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `churn serve` process
    monkeypatch.setattr("churnlib.serving.haproxy.haproxy_binary", lambda: "/usr/sbin/haproxy")
    assert use_high_throughput(cfg("auto")) and use_high_throughput(cfg("on"))
    assert not use_high_throughput(cfg("off"))
    assert not use_high_throughput(cfg("auto", **{"ray.address": "auto"}))  # a cluster's own env decides
    monkeypatch.setattr("churnlib.serving.haproxy.haproxy_binary", lambda: None)
    assert not use_high_throughput(cfg("auto"))
    with pytest.raises(ConfigError, match="no HAProxy binary"):
        use_high_throughput(cfg("on"))


# Rollouts: champion and challenger on live traffic ------------------------------------------


def _rollout_lab(lab, name: str, **extra):
    """Two registered versions that disagree on many records: b (shallow, 8 rounds) the champion,
    a (calibrated, 30 rounds) the challenger. -> (registry, config, version a, version b)."""
    cfg = make_config(lab["ws"], **{"model.registered_name": name, **extra})
    reg = Registry(cfg, **QUIET)
    va, _ = reg.register(lab["runs"]["a"])
    vb, _ = reg.register(lab["runs"]["b"])
    reg.promote(vb.version, force=True)
    return reg, cfg, va.version, vb.version


def _customers(n: int, seed: int, tag: str) -> list[dict]:
    rows = next(iter_chunks(n, seed=seed, chunk_rows=n)).drop(columns=["Churn"])
    out = []
    for i, r in enumerate(rows.to_dict("records")):
        rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
        rec["CustomerID"] = f"{tag}-{i}"
        out.append(rec)
    return out


def _rollout_on(url: str, mode: str | None) -> bool:
    found = requests.get(f"{url}/model", timeout=30).json().get("rollout")
    return (found is None or found.get("mode") is None) if mode is None else bool(found) and found.get("mode") == mode


def test_a_rollout_shadow_canary_promote_abort_under_a_stream_of_requests(lab, deploy):
    """No request fails while a rollout starts in shadow, switches to canary, is promoted (forced),
    a new one starts and is aborted. Shadow: only the champion answers, and the log holds both
    scores under each request id (the shadow's the challenger's own score of the record). Canary:
    each customer meets the version its hash chooses (50 % here), every time. Promote: the
    challenger answers alone. Abort: the champion alone again."""
    import sqlalchemy as sa

    from churnlib.predlog.schema import predictions
    from churnlib.predlog.store import LogStore
    from churnlib.rollout import commands
    from churnlib.rollout.state import bucket

    name = "serve_rollout"
    reg, cfg, va, vb = _rollout_lab(lab, name)
    url = deploy("rollout", {"set": overrides(lab, **{"model.registered_name": name})})
    tag = uuid.uuid4().hex[:8]
    customers = _customers(120, 31, tag)
    seen: list[tuple[float, float, int, str, str, str]] = []  # sent, answered, status, customer, version, rid
    stop = threading.Event()

    def stream(k: int) -> None:
        i = k
        while not stop.is_set():
            rec, rid = customers[i % len(customers)], f"{tag}-r{k}-{i}"
            i += 4
            sent = time.monotonic()
            r = requests.post(f"{url}/predict", json=rec, timeout=30, headers={"X-Request-ID": rid})
            body = r.json() if r.status_code == 200 else {}
            seen.append((sent, time.monotonic(), r.status_code, rec["CustomerID"], body.get("model_version"), rid))

    def answered_since(mark: float) -> int:
        return sum(1 for s in list(seen) if s[0] > mark)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    marks = {}
    try:
        time.sleep(1)
        marks["shadow_asked"] = time.monotonic()
        commands.start(cfg, "shadow", version=va, **QUIET)
        _wait(lambda: _rollout_on(url, "shadow"), 20)
        marks["shadow"] = time.monotonic()
        # each window lasts until it holds enough answers (a count, not a time: a slow machine
        # answers fewer requests a second)
        _wait(lambda: answered_since(marks["shadow"]) > 30, 60)
        marks["canary_asked"] = time.monotonic()
        commands.start(cfg, "canary", share=0.5, **QUIET)
        _wait(lambda: _rollout_on(url, "canary"), 20)
        marks["canary"] = time.monotonic()
        _wait(lambda: answered_since(marks["canary"]) > 60, 60)
        marks["promote_asked"] = time.monotonic()
        commands.promote(cfg, force=True, **QUIET)  # no outcomes yet: forced, and recorded so
        _wait(lambda: requests.get(f"{url}/model", timeout=30).json()["version"] == va and _rollout_on(url, None), 20)
        marks["promoted"] = time.monotonic()
        time.sleep(1)
        commands.start(cfg, "shadow", version=vb, **QUIET)  # the old champion challenges back
        _wait(lambda: _rollout_on(url, "shadow"), 20)
        time.sleep(1)
        marks["abort_asked"] = time.monotonic()
        commands.abort(cfg, **QUIET)
        _wait(lambda: _rollout_on(url, None), 20)
        marks["abort"] = time.monotonic()
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen and all(s[2] == 200 for s in seen), {s[2] for s in seen}
    before_canary = [s for s in seen if s[1] < marks["canary_asked"]]
    assert {s[4] for s in before_canary} == {vb}  # shadow answers nothing
    canary = [s for s in seen if marks["canary"] < s[0] and s[1] < marks["promote_asked"]]
    assert len(canary) > 50
    for _, _, _, cid, version, _ in canary:  # sticky, and the hash's choice
        assert version == (va if bucket(cid) < 0.5 else vb), cid
    assert {s[4] for s in canary} == {va, vb}
    assert {s[4] for s in seen if s[0] > marks["promoted"]} == {va}  # the new champion, alone or shadowed
    assert reg.aliases()["champion"] == va and reg.aliases()["previous"] == vb
    assert "forced by" in reg.version(va).tags["churn.promotion.forced"]
    assert reg.aliases().get("challenger") is None

    # the log: every shadow-window request has the champion's row and the shadow's, one request id
    shadowed = {s[5]: s[3] for s in seen if marks["shadow"] < s[0] and s[1] < marks["canary_asked"]}
    assert len(shadowed) > 20
    store = LogStore(cfg.log_uri)

    def rows() -> list:
        with store.engine.connect() as conn:
            return conn.execute(sa.select(predictions).where(predictions.c.request_id.in_(list(shadowed)))
                                ).mappings().all()

    _wait(lambda: len(rows()) == 2 * len(shadowed), 30)
    got = rows()
    store.close()
    by_route = {(r["request_id"], r["route"]): r for r in got}
    a = load(f"models:/{name}/{va}").predictor
    by_id = {c["CustomerID"]: c for c in customers}
    for rid, cid in shadowed.items():
        champ, shadow = by_route[(rid, "champion")], by_route[(rid, "shadow")]
        assert champ["model_version"] == vb and shadow["model_version"] == va
        assert shadow["customer_id"] == champ["customer_id"] == cid
        from churnlib.data.features import to_matrix

        expected = float(a.score(to_matrix([by_id[cid]], a.spec))[0])
        assert shadow["probability"] == pytest.approx(expected, abs=1e-6)
        assert shadow["latency_ms"] is not None and champ["latency_ms"] is not None


def test_rollout_promote_waits_for_live_evidence_then_moves_the_aliases(lab, deploy):
    """A shadow rollout of the stronger version: `churn rollout promote` is refused (exit 3, no
    alias moves) while no outcome is in; with the outcomes of the customers it scored, it promotes:
    champion -> challenger, previous -> the old champion, the rollout over, Serve follows."""
    import pandas as pd

    from churnlib.rollout import commands

    name = "serve_rollout_promote"
    criteria = {"rollout.criteria.min_volume": 150, "rollout.criteria.min_outcomes": 150,
                "rollout.criteria.bootstrap": 300}
    reg, cfg, va, vb = _rollout_lab(lab, name, **criteria)
    url = deploy("rollout_promote", {"set": overrides(lab, **{"model.registered_name": name})})
    commands.start(cfg, "shadow", version=va, **QUIET)
    _wait(lambda: _rollout_on(url, "shadow"), 20)
    tag = uuid.uuid4().hex[:8]
    customers = _customers(400, 41, tag)
    for k in range(0, 400, 50):  # lists of 50: each record one champion row and one shadow row
        r = requests.post(f"{url}/predict", json=customers[k: k + 50], timeout=30)
        assert r.status_code == 200 and {a["model_version"] for a in r.json()} == {vb}
    sets = [a for kv in criteria.items() for a in ("--set", f"{kv[0]}={kv[1]}")]
    args = ["--set", f"workspace={lab['ws'] / '.churn'}", "--set", f"model.registered_name={name}", *sets]
    time.sleep(2)  # the writer's flush
    refused = run_cli("rollout", "promote", *args, cwd=lab["ws"])
    assert refused.returncode == 3, refused.stderr
    assert "refused: outcomes joined: champion 0, challenger 0" in refused.stderr
    assert reg.aliases()["champion"] == vb and reg.aliases()["challenger"] == va
    # the outcomes come in (the generated table's own labels, observed a week later)
    labels = next(iter_chunks(400, seed=41, chunk_rows=400))["Churn"].to_numpy()
    when = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=7)).isoformat()
    out = lab["ws"] / f"outcomes-{tag}.csv"
    pd.DataFrame({"CustomerID": [c["CustomerID"] for c in customers], "Churn": labels,
                  "observed_at": when}).to_csv(out, index=False)
    from churnlib.monitor.outcomes import load_outcomes

    assert load_outcomes(cfg, str(out), **QUIET).loaded == 400
    status = commands.status(cfg, **QUIET)
    assert status["pairs"] == 400 and status["challenger"]["outcomes"] == 400
    assert status["challenger"]["roc_auc"] > status["champion"]["roc_auc"]
    assert status["verdict"]["promote"], status["verdict"]
    done = commands.promote(cfg, **QUIET)
    assert done["version"] == va and done["previous"] == vb
    aliases = reg.aliases()
    assert aliases["champion"] == va and aliases["previous"] == vb and "challenger" not in aliases
    live = json.loads(reg.version(va).tags["churn.promotion.live"])
    assert live["verdict"]["promote"] and live["records"]["challenger"] == 400
    _wait(lambda: requests.get(f"{url}/model", timeout=30).json()["version"] == va and _rollout_on(url, None), 20)
    gone = run_cli("rollout", "status", *args, cwd=lab["ws"])
    assert gone.returncode == 2 and f"{name} has no rollout" in gone.stderr


def test_a_failing_challenger_never_fails_a_request(lab, deploy, tmp_path):
    """A challenger that cannot be loaded (not a churn model), then one that raises on every record
    (trained with a column the requests do not carry): in shadow and in canary, every request is
    answered, by the champion; /healthz says what went wrong."""
    import pandas as pd

    from churnlib.rollout import commands

    name = "serve_rollout_failing"
    reg, cfg, va, vb = _rollout_lab(lab, name)
    broken, _ = reg.register(lab["runs"]["broken"])
    data = pd.read_parquet(lab["ws"] / "train.parquet").assign(Extra=1.0)
    data.to_parquet(tmp_path / "extra.parquet")
    numeric = [*lab["cfg"].features.numeric, "Extra"]
    extra_run = log_local_model(make_config(lab["ws"], **{"features.numeric": numeric}), tmp_path / "extra.parquet",
                                rounds=5, run_name="extra")
    extra, _ = reg.register(extra_run)
    url = deploy("rollout_failing", {"set": overrides(lab, **{"model.registered_name": name})})
    customers = _customers(30, 51, uuid.uuid4().hex[:8])
    codes: list[int] = []
    versions: set = set()

    def burst() -> None:
        for c in customers:
            r = requests.post(f"{url}/predict", json=c, timeout=30)
            codes.append(r.status_code)
            versions.add(r.json().get("model_version"))
        r = requests.post(f"{url}/predict", json=customers, timeout=30)
        codes.append(r.status_code)
        versions.update(a.get("model_version") for a in r.json())

    commands.start(cfg, "shadow", version=broken.version, **QUIET)
    _wait(lambda: "failed to load" in (requests.get(f"{url}/healthz", timeout=30).json()["rollout"] or {}).get(
        "error", ""), 20)
    burst()
    commands.start(cfg, "canary", share=0.9, version=broken.version, force=True, **QUIET)
    time.sleep(1.5)
    burst()
    commands.start(cfg, "canary", share=0.9, version=extra.version, force=True, **QUIET)
    _wait(lambda: _rollout_on(url, "canary") and requests.get(f"{url}/model", timeout=30).json()["rollout"][
        "challenger_version"] == extra.version, 20)
    burst()
    time.sleep(1.2)  # two polls of the registry: the same challenger keeps its last failure on /healthz
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert "canary: challenger version" in health["rollout"]["error"] and "missing column" in health["rollout"]["error"]
    commands.start(cfg, "shadow", version=extra.version, **QUIET)
    _wait(lambda: _rollout_on(url, "shadow"), 20)
    burst()
    _wait(lambda: "shadow: challenger version" in (requests.get(f"{url}/healthz", timeout=30).json()["rollout"]
                                                  or {}).get("error", ""), 20)
    assert codes and set(codes) == {200}
    assert versions == {vb}  # the champion answered everything
    commands.abort(cfg, **QUIET)
