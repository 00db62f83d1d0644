"""Benchmark: our Ray Serve app vs `mlflow models serve`, the same model version, one client.

    python benchmarks/serve_load.py [--seconds 15] [--mlflow-workers 2] [--out benchmarks/results/serve_load.json]
    python benchmarks/serve_load.py --log --out benchmarks/results/serve_log.json   # the prediction log's cost
    python benchmarks/serve_load.py --outage 30 --out benchmarks/results/serve_log_outage.json  # PostgreSQL cut
    python benchmarks/serve_load.py --rollout --cases single_c8 single_c32 --out benchmarks/results/serve_shadow.json

Trains a depth-6 model (200,000 generated rows, 100 rounds), registers it as
the champion in a temporary MLflow store, then serves it, in turn, with

- ours: `churn serve --replicas N` (Ray Serve, FastAPI ingress, @serve.batch,
  its own Ray instance, high-throughput mode when HAProxy is available),
  started as a separate process;
- mlflow: `mlflow models serve -m models:/…@champion --env-manager local -w N`,

with the same number N of worker processes (``--mlflow-workers``, default 2;
``--replicas`` overrides ours).

Each is loaded by one asyncio client (aiohttp, keep-alive connections) in
this process, on the same 2 cores: single-record requests at concurrency 1,
8 and 32, then 256-record requests at concurrency 8, each for ``--seconds``
after a warm-up. Prints requests/s, rows/s, p50/p99 latency and errors per
case, the ratios ours/mlflow, and writes JSON. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

CASES = [("single", 1, 1), ("single", 8, 1), ("single", 32, 1), ("batch256", 8, 256)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(workspace: Path, challenger: bool = False) -> tuple[str, list[dict]]:
    """Train, log, register and promote one model (and, with ``challenger``, register a second one
    of the same size trained on half the rows: version 2); -> (tracking URI, raw records)."""
    import mlflow
    import numpy as np
    import xgboost as xgb

    from churnlib import tracking
    from churnlib.config import load_config
    from churnlib.data.features import FeatureSpec
    from churnlib.data.generation import generate, iter_chunks
    from churnlib.data.preparation import encode_batch
    from churnlib.data.sources import check_columns, resolve_source
    from churnlib.model.packaging import log_model
    from churnlib.registry.registry import Registry

    cfg = load_config(overrides={"workspace": str(workspace)}, env={})
    spec = FeatureSpec.from_config(cfg.features)
    path = generate(200_000, workspace / "train.parquet", seed=1)
    source = resolve_source(str(path))
    columns = check_columns(source, spec)
    import pandas as pd

    enc = encode_batch(pd.read_parquet(path), spec, columns, 0.2, 1)
    d = xgb.DMatrix(enc["X"], label=enc["y"], feature_names=spec.feature_names, feature_types=spec.feature_types,
                    enable_categorical=True)
    booster = xgb.train({**cfg.xgb_params(), "nthread": os.cpu_count(), "max_depth": 6}, d, 100)
    tracking.connect(cfg)
    with tracking.tracked_run(cfg, "serve-benchmark", {"data.digest": source.digest}) as run:
        log_model(cfg, spec, source, columns, booster, 99, run.info.run_id)
    reg = Registry(cfg, say=lambda m: None)
    version, _ = reg.register(run.info.run_id)
    reg.promote(version.version, force=True)
    if challenger:  # a retrain of the same size on another sample: what a challenger usually is
        half = np.random.default_rng(2).random(len(enc["y"])) < 0.5
        d2 = xgb.DMatrix(enc["X"][half], label=enc["y"][half], feature_names=spec.feature_names,
                         feature_types=spec.feature_types, enable_categorical=True)
        other = xgb.train({**cfg.xgb_params(), "nthread": os.cpu_count(), "max_depth": 6, "seed": 2}, d2, 100)
        with tracking.tracked_run(cfg, "serve-benchmark-challenger", {"data.digest": source.digest}) as run:
            log_model(cfg, spec, source, columns, other, 99, run.info.run_id)
        reg.register(run.info.run_id)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    raw = next(iter_chunks(2000, seed=5, chunk_rows=2000)).drop(columns=["Churn"])
    records = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in raw.to_dict("records")]
    return cfg.tracking_uri, records


def export_model(tracking_uri: str, folder: Path) -> Path:
    """The champion's booster and feature spec as files, for the BentoML service."""
    import mlflow

    from churnlib.model import loading

    mlflow.set_tracking_uri(tracking_uri)
    predictor = loading.load("models:/xgboost_churn_model@champion").predictor
    folder.mkdir(parents=True, exist_ok=True)
    predictor.booster.save_model(str(folder / "booster.ubj"))
    (folder / "feature_spec.json").write_text(json.dumps(predictor.spec.to_dict()))
    return folder


async def load(url: str, body_of, concurrency: int, seconds: float, rows_per_request: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    answered = 0  # every 200, the warm-up's too: what the prediction log must hold
    stop_at = 0.0

    async def worker(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal errors, answered
        i = k
        while time.perf_counter() < stop_at:
            payload = body_of(i)
            i += concurrency
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                answered += 1
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop_at = time.perf_counter() + min(3.0, seconds / 3)  # warm-up
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        latencies.clear()
        errors = 0
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def q(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "answered_rows": answered * rows_per_request, "errors": errors, "seconds": wall,
            "rps": len(lat) / wall,
            "rows_per_s": len(lat) * rows_per_request / wall, "p50_ms": q(0.50), "p99_ms": q(0.99)}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of a server and every process under it (Ray's, HAProxy)."""
    import psutil

    if pid is None:
        return float("nan")
    total = 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return float("nan")
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _body(records: list[dict], single: bool, wire: str) -> bytes:
    """One request's body as each server takes it: ours a record or a list of them, MLflow's
    ``dataframe_records``, BentoML's named argument (always a list: its batching dimension)."""
    if wire == "mlflow":
        return json.dumps({"dataframe_records": records}).encode()
    if wire == "bentoml":
        return json.dumps({"records": records}).encode()
    return json.dumps(records[0] if single else records).encode()


def run_cases(name: str, predict_url: str, records: list[dict], seconds: float, wire: str,
              only: list[str] | None = None, server_pid: int | None = None) -> dict:
    """Each case -> its numbers; with ``server_pid``, the server's CPU time per request too (the
    whole process tree, warm-up included: CPU seconds over every request answered)."""
    out = {}
    for kind, conc, rows in CASES:
        if only and f"{kind}_c{conc}" not in only:
            continue
        if rows == 1:
            bodies = [_body([r], True, wire) for r in records]
        else:
            chunks = [records[i: i + rows] for i in range(0, len(records) - rows + 1, rows)]
            bodies = [_body(c, False, wire) for c in chunks]
        cpu0 = tree_cpu_s(server_pid)
        res = asyncio.run(load(predict_url, lambda i, b=bodies: b[i % len(b)], conc, seconds, rows))
        res["cpu_ms_per_request"] = 1000 * (tree_cpu_s(server_pid) - cpu0) / max(res["answered_rows"] / rows, 1)
        key = f"{kind}_c{conc}"
        out[key] = res
        print(f"  {name:7s} {key:14s} {res['rps']:8.1f} req/s {res['rows_per_s']:10.0f} rows/s  "
              f"p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  "
              f"server CPU {res['cpu_ms_per_request']:.3f} ms/request", flush=True)
    return out


def print_ratios(title: str, a: dict, b: dict) -> dict:
    """Throughput and p99 of ``a`` over ``b``, case by case, printed -> the ratios."""
    print(title)
    ratios = {}
    for key in a:
        ratios[key] = {"rps": a[key]["rps"] / b[key]["rps"], "p99": a[key]["p99_ms"] / b[key]["p99_ms"],
                       "cpu_per_request": a[key].get("cpu_ms_per_request", float("nan"))
                       / b[key].get("cpu_ms_per_request", float("nan"))}
        print(f"  {key:14s} throughput {ratios[key]['rps']:.2f}x   p99 {ratios[key]['p99']:.2f}x   "
              f"server CPU per request {ratios[key]['cpu_per_request']:.2f}x")
    return ratios


def log_rows(uri: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar()
    engine.dispose()
    return n


def drain(uri: str, spool: Path) -> dict:
    """After a server with the log stopped: the rows in the log, then what its replicas left in
    the spool (a backlog the database had not taken yet, or the outage's) loaded as `churn monitor`
    would, timed; so that the next server does not pay for this one's backlog."""
    from churnlib.predlog.writer import replay_orphans

    at_stop = log_rows(uri)
    t0 = time.perf_counter()
    left = replay_orphans(uri, spool)
    took = time.perf_counter() - t0
    print(f"  log: {at_stop} rows at the stop; {left} left in the spool, loaded after it in {took:.1f} s", flush=True)
    return {"at_stop": at_stop, "left_in_spool": left, "load_s": took}


def count_log(uri: str, answered: int, drains: list[dict]) -> dict:
    logged = log_rows(uri)
    print(f"\nprediction log: {logged} rows for {answered} answered records ({answered - logged} lost)")
    return {"logged": logged, "answered": answered, "lost": answered - logged, "drains": drains}


class Outage:
    """A fresh PostgreSQL database for the log, reached through a TCP forwarder that is cut for
    ``seconds`` (``start`` after ``after`` seconds) and restored on the same port."""

    def __init__(self, seconds: float):
        import uuid

        import psycopg

        from tests.conftest import Forwarder

        self.seconds = seconds
        self.db = f"churn_bench_{uuid.uuid4().hex[:8]}"
        self.admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
        self.admin.execute(f"CREATE DATABASE {self.db}")
        self.forwarder = Forwarder(("127.0.0.1", 5432))
        self.uri = f"postgresql://postgres@127.0.0.1:{self.forwarder.port}/{self.db}"
        self.direct_uri = f"postgresql://postgres@127.0.0.1:5432/{self.db}"
        self.cut_at = self.restored_at = None

    def start(self, after: float) -> None:
        import threading

        def cut() -> None:
            time.sleep(after)
            self.forwarder.cut()
            self.cut_at = time.time()
            print(f"  PostgreSQL cut for {self.seconds:.0f} s", flush=True)
            time.sleep(self.seconds)
            self.forwarder.restore()
            self.restored_at = time.time()
            print("  PostgreSQL back", flush=True)

        threading.Thread(target=cut, daemon=True).start()

    def close(self) -> None:
        self.admin.execute(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        self.admin.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--mlflow-workers", type=int, default=2)
    ap.add_argument("--replicas", type=int, help="our replicas (default: as many as mlflow's workers)")
    ap.add_argument("--only", choices=["ours", "mlflow", "bentoml"])
    ap.add_argument("--bentoml-python", default=os.environ.get("CHURN_BENTOML_PYTHON"),
                    help="a Python whose environment has bentoml (its own virtualenv: python -m venv .bento && "
                         ".bento/bin/pip install bentoml xgboost pandas): BentoML serves the same booster too "
                         "(benchmarks/bento_service.py); default $CHURN_BENTOML_PYTHON, unset: skipped")
    ap.add_argument("--cases", nargs="+", choices=[f"{k}_c{c}" for k, c, _ in CASES],
                    help="run only these cases (default: all)")
    ap.add_argument("--log", action="store_true",
                    help="ours with the prediction log off, then on (instead of ours vs mlflow): the log's cost, and "
                         "whether every answered record is in it")
    ap.add_argument("--repeat", type=int, default=1,
                    help="--log/--rollout: the off, on, on, off sequence this many times (more alternations: less "
                         "of the machine's drift in the ratios)")
    ap.add_argument("--rollout", action="store_true",
                    help="ours with no rollout, then with a shadow challenger (a second, deeper model scoring every "
                         "record off the response path): what the shadow costs in latency and throughput")
    ap.add_argument("--outage", type=float, metavar="SECONDS",
                    help="ours with the log on PostgreSQL (127.0.0.1:5432, user postgres) through a TCP forwarder "
                         "cut for SECONDS under single-record load at concurrency 8: failed requests, records lost")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for our server (e.g. serve.batch_wait_timeout_s=0)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_load.json"))
    args = ap.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="churn-serve-bench-"))
    print(f"preparing a model in {workspace}", flush=True)
    tracking_uri, records = prepare(workspace, challenger=args.rollout)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONPATH"] = str(REPO)
    bindir = Path(sys.executable).parent
    results: dict[str, dict] = {}

    servers = {
        "ours": lambda port: [sys.executable, "-m", "churnlib", "serve", "--port", str(port),
                              "--replicas", str(args.replicas or args.mlflow_workers),
                              "--set", f"workspace={workspace}", *[a for kv in args.sets for a in ("--set", kv)]],
        "mlflow": lambda port: [str(bindir / "mlflow"), "models", "serve", "-m", "models:/xgboost_churn_model@champion",
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(args.mlflow_workers)],
    }
    if args.bentoml_python and not (args.log or args.rollout or args.outage):
        bentoml_bin = Path(args.bentoml_python).parent / "bentoml"
        if not bentoml_bin.exists():
            raise SystemExit(f"--bentoml-python {args.bentoml_python}: no bentoml beside it ({bentoml_bin})")
        env["CHURN_BENTO_MODEL"] = str(export_model(tracking_uri, workspace / "bento_model"))
        servers["bentoml"] = lambda port: [str(bentoml_bin), "serve", "benchmarks.bento_service:ChurnModel",
                                           "--working-dir", str(REPO), "--host", "127.0.0.1", "--port", str(port)]
    order = list(servers)
    if args.log:
        # off, on, on, off: each setting runs once early and once late, so the machine's drift
        # over the run (caches, heat) does not favour one
        ours = servers["ours"]
        servers = {"log_off": lambda port: [*ours(port), "--set", "monitoring.log_serving=false"],
                   "log_on": lambda port: [*ours(port), "--set", "monitoring.log_serving=true"]}
        order = ["log_off", "log_on", "log_on", "log_off"] * args.repeat
    outage = outage_uri = None
    rollout_cfg = None
    if args.rollout:
        from churnlib.config import load_config

        rollout_cfg = load_config(overrides={"workspace": str(workspace)}, env={})
        ours = servers["ours"]
        servers = {"off": ours, "shadow": ours}  # the same server; the registry's rollout differs
        order = ["off", "shadow", "shadow", "off"] * args.repeat
    if args.outage:
        outage = Outage(args.outage)
        outage_uri = outage.direct_uri
        ours = servers["ours"]
        servers = {"outage": lambda port: [*ours(port), "--set", "monitoring.log_serving=true",
                                           "--set", f"monitoring.log_uri={outage.uri}"]}
        order = ["outage"]
        args.cases = ["single_c8"]
        warmup = min(3.0, (args.outage + 20) / 3)
        args.seconds = args.outage + 20  # 5 s before the cut, 15 s after it
    runs: dict[str, list[dict]] = {}
    drains: list[dict] = []
    for name in order:
        command = servers[name]
        if args.only and name != args.only:
            continue
        if rollout_cfg is not None:  # the rollout is the registry's: set before the server starts
            from churnlib.registry.registry import Registry
            from churnlib.rollout import commands

            if name == "shadow":
                commands.start(rollout_cfg, "shadow", version="2", say=lambda m: None)
            elif commands.current(Registry(rollout_cfg, say=lambda m: None)) is not None:
                commands.abort(rollout_cfg, say=lambda m: None)
        port = free_port()
        log = open(workspace / f"{name}.log", "w")
        proc = subprocess.Popen(command(port), env=env, cwd=workspace, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wire = name if name in ("mlflow", "bentoml") else "ours"
            mine = wire == "ours"
            if rollout_cfg is not None and name == "shadow":  # the replicas load the challenger
                time.sleep(2)
            health = f"http://127.0.0.1:{port}/" + {"ours": "healthz", "mlflow": "health", "bentoml": "readyz"}[wire]
            wait_ready(health, proc)
            time.sleep(3 if mine else 1)
            url = f"http://127.0.0.1:{port}/" + ("invocations" if wire == "mlflow" else "predict")
            print(f"{name}: {' '.join(command(port)[:4])}… on port {port}", flush=True)
            if outage is not None:
                outage.start(after=warmup + 5)
            runs.setdefault(name, []).append(
                run_cases(name, url, records, args.seconds, wire, only=args.cases,
                          server_pid=proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        if name in ("log_on", "outage"):
            drains.append(drain(outage_uri or f"sqlite:///{workspace / 'prediction_log.db'}", workspace / "spool"))
    for name, done in runs.items():  # each case: the mean of the runs (requests summed for the log count)
        results[name] = {key: {**{m: sum(r[key][m] for r in done) / len(done) for m in done[0][key]},
                               "answered_rows": sum(r[key]["answered_rows"] for r in done)}
                         for key in done[0]}

    if {"log_off", "log_on"} <= set(results):
        # the server stopped gracefully (SIGINT): its writers loaded what they could in the grace
        # time and left the rest in the spool, which the next reader (churn monitor) loads
        answered = sum(r["answered_rows"] for r in results["log_on"].values())
        results["log"] = count_log(f"sqlite:///{workspace / 'prediction_log.db'}", answered, drains)
        results["ratios_log"] = print_ratios("ratio log on / log off:", results["log_on"], results["log_off"])
    if {"off", "shadow"} <= set(results):
        results["ratios_shadow"] = print_ratios("ratio shadow / off:", results["shadow"], results["off"])
    if "outage" in results:
        results["outage"]["log"] = count_log(outage_uri, results["outage"]["single_c8"]["answered_rows"], drains)
    if {"ours", "mlflow"} <= set(results):
        results["ratios"] = print_ratios("\nratio ours / mlflow:", results["ours"], results["mlflow"])
    if {"ours", "bentoml"} <= set(results):
        results["ratios_bentoml"] = print_ratios("\nratio ours / bentoml:", results["ours"], results["bentoml"])
    if outage is not None:
        res = results["outage"]
        print(f"outage {args.outage:.0f} s: {res['single_c8']['errors']} failed requests, {res['log']['lost']} "
              f"records lost of {res['log']['answered']}")
        outage.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "seconds": args.seconds, "mlflow_workers": args.mlflow_workers,
                               "replicas": args.replicas or args.mlflow_workers, "config_overrides": args.sets,
                               "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
