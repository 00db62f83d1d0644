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
_LEAKY_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "RAY_ADDRESS", "CHURN_WORKSPACE",
              "CHURN_LOG_URI")


def pytest_configure(config: Any) -> None:
    for var in _LEAKY_ENV:
        os.environ.pop(var, None)


# The unit tier (`python -m pytest -m unit`): no Ray instance, no server, no database.
# A unit test that asks for one of these fixtures is a mistake in the test, caught here.
_NOT_UNIT_FIXTURES = {"ray_session", "mlflow_server", "postgres_db", "s3_endpoint", "lab", "champion", "deploy",
                      "trained", "sweep", "served", "ray_cluster"}


# The longest modules first (measured here, slowest first): the suite runs in two processes
# (pytest-xdist, whole files per process, in this order: `--no-loadscope-reorder`), so the
# longest files start at once instead of last. Every other module follows in its own order.
SLOW_FIRST = ("test_serve", "test_registry", "test_quickstart", "test_infrastructure", "test_training", "test_tune",
              "test_evaluation", "test_batch", "test_ray_job", "test_instance")


def _module_rank(item: Any) -> int:
    name = Path(str(item.fspath)).stem
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    for item in items:
        if item.get_closest_marker("unit"):
            heavy = _NOT_UNIT_FIXTURES & set(getattr(item, "fixturenames", ()))
            if heavy:
                raise pytest.UsageError(f"{item.nodeid} is marked unit but uses {sorted(heavy)}")
    items.sort(key=_module_rank)  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _unit_starts_no_ray(request: pytest.FixtureRequest):
    """A unit test must not connect this process to Ray (in the full suite, the session's may already be up)."""

    def connected() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    before = connected()
    yield
    if request.node.get_closest_marker("unit") and not before:
        assert not connected(), f"{request.node.nodeid} is marked unit but connected to Ray"
    # A command run in this process must leave the caller's Ray connection alone: one that shut
    # the session's instance down (a sweep's early release did) made later tests' plain
    # ray.init() (Ray Data's own) attach to a dead recorded cluster and hang for 900 s in CI.
    if before and "ray_session" in request.fixturenames:
        assert connected(), f"{request.node.nodeid} disconnected this process from the session's Ray instance"


def free_port() -> int:
    """A free port for a server, below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0) can be taken by any outgoing connection before the server binds it (a CI run lost
    `churn serve`'s HAProxy that way: "failed to start their listeners")."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free down there: the kernel's choice
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


def session_ray_env() -> dict:
    """What makes a `churn` subprocess join this session's Ray instance, when it is up.

    A command that only needs a cluster (validate, predict, drift, evaluate) then
    runs as on a cluster, without starting (and stopping) an instance of its own:
    about 5 s less per command here. Commands whose test is about the local
    instance itself (signals, `churn serve`, train and tune) keep starting their own.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    address = ray._private.worker.global_worker.node.address  # the GCS, host:port
    return {"RAY_ADDRESS": address, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600, attach: bool = False):
    """Run `python -m churnlib ...` in a subprocess (the real CLI, exit codes and streams);
    ``attach``: on the session's Ray instance (``session_ray_env``)."""
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    if attach:
        full_env.update(session_ray_env())
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "churnlib", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_local_model(cfg, data_path, rounds: int = 40, run_name: str = "local-model", calibrate: bool = False,
                    **params: Any) -> str:
    """Train a booster in this process on ``data_path`` and log it as `churn train` logs its model.

    The model (pyfunc on raw records, booster, feature spec, signature) is the
    real artifact format: ``churnlib.training.log_model`` writes it. Only the
    fitting skips Ray Train, which test_training covers, so a test can make
    several models of known quality in seconds. Returns the run id.

    Without ``calibrate`` every row grows the trees and the model carries no calibrator and
    no chosen cut; with it, the validation rows are held out and ``churnlib.train.decide``
    fits the calibrator and chooses the cut on them, as `churn train` does.
    """
    import pandas as pd
    import xgboost as xgb

    from churnlib import tracking
    from churnlib.data.features import FeatureSpec
    from churnlib.data.preparation import encode_batch
    from churnlib.data.sources import check_columns, resolve_source
    from churnlib.model.packaging import log_model

    spec = FeatureSpec.from_config(cfg.features)
    source = resolve_source(str(data_path))
    columns = check_columns(source, spec)
    raw = pd.read_parquet(data_path) if str(data_path).endswith(".parquet") else pd.read_csv(data_path)
    enc = encode_batch(raw, spec, columns, cfg.model.validation_split, cfg.model.random_state)
    ok = enc["flags"] == 0
    grow = ok & ~enc["is_valid"].astype(bool) if calibrate else ok
    dtrain = xgb.DMatrix(enc["X"][grow], label=enc["y"][grow], feature_names=spec.feature_names,
                         feature_types=spec.feature_types, enable_categorical=True)
    booster = xgb.train({**cfg.xgb_params(), "nthread": 1, **params}, dtrain, rounds)
    contact = None
    if calibrate:
        from churnlib.data.preparation import Prepared
        from churnlib.train.decide import decide

        contact = decide(cfg, Prepared(dataset=None, report=None, train_rows=int(grow.sum()),
                                       valid_rows=int((ok & ~grow).sum()), local=enc), booster)
    tracking.connect(cfg)
    from churnlib.data.profiles import build_profile

    tags = {"churn.command": "train", "data.digest": source.digest, "data.source": source.uri}
    with tracking.tracked_run(cfg, run_name, tags) as run:
        log_model(cfg, spec, source, columns, booster, rounds - 1, run.info.run_id, build_profile(enc["X"][ok], spec),
                  contact)
    return run.info.run_id


def no_running_runs(cfg) -> bool:
    """True when the store holds no run left RUNNING (every path ends its run)."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'", output_format="list")
    return not runs


# Real services: PostgreSQL, an S3 API (moto's standalone server), an MLflow server -------------------


def require_service(what: str, detail: str):
    """A service a test needs is missing: a skip on a laptop, a failure in CI (CI=true)."""
    message = f"{what} is not available: {detail}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI needs it: .ci/run starts what the machine does not run)")
    pytest.skip(message)


def wait_http(url: str, proc: Any = None, timeout: float = 120, ok=(200,)) -> None:
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def start_moto(extra_env: dict | None = None):
    """moto's standalone S3 server on a free loopback port -> (process, endpoint URL)."""
    import subprocess

    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc, timeout=60, ok=range(100, 600))  # any HTTP answer: with auth on, / is an error
    except RuntimeError as exc:
        proc.kill()
        require_service("moto's S3 server", str(exc))
    return proc, url


S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API for the session (moto stands in for MinIO, which cannot be installed here)."""
    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres_db():
    """A fresh PostgreSQL database for the session on 127.0.0.1:5432 (user postgres, trust auth)."""
    import uuid

    try:
        import psycopg

        admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5,
                                autocommit=True)
    except Exception as exc:  # noqa: BLE001 - driver missing or server down
        require_service("PostgreSQL at 127.0.0.1:5432", str(exc).strip().splitlines()[0])
    name = f"churn_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield {"name": name, "uri": f"postgresql://postgres@127.0.0.1:5432/{name}"}
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def start_mlflow_server(backend_uri: str, artifacts: str, env_extra: dict, log_path: Path):
    """`mlflow server` as a subprocess on a free port, artifacts proxied -> (process, URI)."""
    import subprocess

    port = free_port()
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(env_extra)
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(bindir / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts,
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, timeout=180)
    except RuntimeError as exc:
        proc.kill()
        raise RuntimeError(f"{exc}; see {log_path}") from None
    return proc, uri


def stop(proc) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlflow_server(postgres_db, s3_endpoint, tmp_path_factory):
    """A real MLflow tracking server: PostgreSQL metadata, S3 (moto) artifacts, proxied to clients."""
    import boto3

    bucket = "churn-artifacts"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    log = tmp_path_factory.mktemp("mlflow_server") / "server.log"
    proc, uri = start_mlflow_server(postgres_db["uri"], f"s3://{bucket}/mlflow",
                                    {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **S3_KEYS}, log)
    yield {"uri": uri, "bucket": bucket, "s3": s3_endpoint, "db": postgres_db, "log": log}
    stop(proc)


# Signals: a real command in its own session, a real signal ------------------------------------------


class Forwarder:
    """A TCP forwarder to a server (PostgreSQL) that can be cut and restored: the server 'going
    down' for one client only, then coming back on the same port."""

    def __init__(self, target: tuple[str, int]):
        import socket
        import threading

        self.target = target
        self.port = 0
        self.conns: list = []
        self.up = False
        self._threading, self._socket = threading, socket
        self.restore()

    def restore(self) -> None:
        socket = self._socket
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self._threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while self.up:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                return
            server = self._socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        """Every open connection reset and nothing listening: the server is gone."""
        self.up = False
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(self._socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.conns = []


def cli_env(**extra: str) -> dict:
    """The environment for a `python -m churnlib` subprocess (nothing pointing elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def signal_cli(args: list, trigger: str, signum: int, group: bool, cwd: Path, env: dict | None = None,
               timeout: float = 300, on_start=None, lines: list | None = None):
    """Run `python -m churnlib *args` in its own session; when ``trigger`` appears on stderr, send
    ``signum`` to the process (``group``: to its whole process group, as a terminal's Ctrl-C does).

    -> (exit code, stderr, seconds from the signal to the exit, pids of its descendants just
    before the signal). ``on_start(proc)`` runs just before the signal (load, checks); ``lines``,
    when given, receives stderr's lines as they come (``on_start`` can read what was printed)."""
    import subprocess
    import threading
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "churnlib", *map(str, args)], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = [] if lines is None else lines
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if trigger in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not seen.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not seen.is_set():
            raise AssertionError(f"{trigger!r} never appeared: {''.join(lines)[-3000:]}")
        if on_start is not None:
            on_start(proc)
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        sent = time.monotonic()
        (os.killpg if group else os.kill)(proc.pid, signum)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 120 s after the signal: {''.join(lines)[-3000:]}") from None
    finally:
        if proc.poll() is None:  # whatever failed, stop what this test started: its whole group
            stop(proc)
    took = time.monotonic() - sent
    reader.join(timeout=5)
    return proc.returncode, "".join(lines), took, tree


def alive(pids: list[int], grace_s: float = 10.0) -> list[str]:
    """The processes among ``pids`` still running ``grace_s`` after the command exited (zombies
    excepted), described. The grace covers the last of a stopped Ray node's helpers: the
    dashboard's forkserver leaves when its parent's socket closes, a moment after the parent (a
    run beside other tests found it alive at the instant the command had exited)."""
    import time

    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + grace_s
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return out


# What a person sees: headless Chromium from Debian's packages -----------------------------------------


def chromium() -> str:
    """Debian's Chromium; its absence is a skip on a laptop, a failure in CI."""
    import shutil

    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    require_service("Chromium (Debian's package)", "not on PATH")
    raise AssertionError("unreachable")


def chromium_dom(url: str, profile: Path, screenshot: Path | None = None, wait_ms: int = 15000) -> str:
    """The page at ``url`` after its scripts ran (``--dump-dom``), in a headless Chromium whose every
    host but 127.0.0.1 resolves nowhere (no network: what works offline works here); a PNG too."""
    import subprocess

    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile / 'chromium'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=direct://",
            f"--virtual-time-budget={wait_ms}", "--window-size=1280,2000"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
    res = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout
