"""The prediction log on real databases: migrations, idempotent inserts, and the writer that never
makes a request wait, on SQLite and on PostgreSQL cut (a TCP forwarder dropped and restored)
under a stream of records: nothing lost, nothing twice, the order kept."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from churnlib.predlog.schema import decode_features, encode_features, metadata
from churnlib.predlog.store import LogStore
from churnlib.predlog.writer import Answered, LogWriter, replay_orphans
from tests.conftest import REPO, Forwarder, free_port


def _row(i: int) -> dict:
    """A prediction row as a dict (the store's general insert)."""
    return {"prediction_id": str(uuid.uuid4()), "ts": dt.datetime.now(dt.timezone.utc), "request_id": f"r{i}",
            "customer_id": str(i), "model_name": "m", "model_version": "1", "route": "champion",
            "endpoint": "predict", "probability": (i % 100) / 100, "label": int(i % 100 >= 50), "contact": i % 3 == 0,
            "expected_value": 1.5, "features": encode_features(np.array([i, 1.0], dtype=np.float32))}


def _answered(first: int, n: int = 10, request_id: str | None = None) -> Answered:
    """One request's answers as Serve hands them to the writer: records first .. first + n - 1,
    request ids r<first> ... (one per record here, to check the order record by record)."""
    i = np.arange(first, first + n)
    return Answered(ts=dt.datetime.now(dt.timezone.utc), request_id=request_id or f"r{first}", model_name="m",
                    model_version="1", route="champion", endpoint="predict", customer_ids=[str(k) for k in i],
                    probability=(i % 100) / 100, label=(i % 100 >= 50).astype(int), contact=i % 3 == 0,
                    expected_value=np.full(n, 1.5), X=np.stack([i, np.ones(n)], axis=1).astype(np.float32))


def _wait_unlocked(root, timeout: float = 20.0) -> None:
    """Until every writer folder under ``root`` has a free lock (its writer and loader gone)."""
    import fcntl

    deadline = time.monotonic() + timeout
    for lock in root.glob("*/lock"):
        with open(lock, "a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{lock} still locked"
                    time.sleep(0.05)


@pytest.fixture
def pg_log(postgres_db):
    """A fresh PostgreSQL database for one test's prediction log."""
    import psycopg

    name = f"churn_log_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    yield name
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_make_the_schema_the_code_describes_once(backend, tmp_path, request):
    uri = (f"sqlite:///{tmp_path / 'log.db'}" if backend == "sqlite"
           else f"postgresql://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_log')}")
    store = LogStore(uri)
    assert store.version() is None
    assert store.migrate() == "0002" and store.migrate() == "0002"  # twice: nothing more
    inspector = sa.inspect(store.engine)
    for table in metadata.sorted_tables:
        found = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert list(found) == [c.name for c in table.columns], table.name
        for column in table.columns:
            assert found[column.name]["nullable"] == column.nullable, (table.name, column.name)
    # idempotent inserts: the same prediction ids, the same (customer, observed_at)
    rows = [_row(i) for i in range(5)]
    assert store.insert_predictions(rows) == 5 and store.insert_predictions(rows + [_row(5)]) == 1
    assert store.count("predictions") == 6
    now = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    outcome = {"customer_id": "1", "outcome": 1, "observed_at": now, "loaded_at": now, "source": "f.csv"}
    assert store.insert_outcomes([outcome]) == 1 and store.insert_outcomes([outcome]) == 0
    store.close()


def test_a_log_made_by_the_first_schema_is_upgraded_keeping_its_rows(tmp_path):
    """0001 -> 0002 (the latency column, the request index) on a log with rows in it."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from churnlib.predlog.store import MIGRATIONS

    store = LogStore(f"sqlite:///{tmp_path / 'log.db'}")
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(sa.text(
            "INSERT INTO predictions (prediction_id, ts, model_name, model_version, route, endpoint, probability, "
            "label, features) VALUES ('p1', '2026-11-30 10:00:00.000000', 'm', '1', 'champion', 'predict', 0.3, 0, "
            "x'00')"))
    assert store.version() == "0001"
    assert store.migrate() == "0002"
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT prediction_id, latency_ms FROM predictions")).all() == [("p1", None)]
    assert "ix_predictions_request" in {i["name"] for i in sa.inspect(store.engine).get_indexes("predictions")}
    store.close()


def test_migrating_from_many_processes_at_once_migrates_once(tmp_path):
    """Replicas starting together: the lock lets one migrate; the others find the schema there."""
    uri = f"sqlite:///{tmp_path / 'log.db'}"
    code = ("import sys; from churnlib.predlog.store import LogStore; print(LogStore(sys.argv[1]).migrate())")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    assert [o.strip() for o, _ in outs] == ["0002"] * 4


def test_an_unreachable_database_is_one_line_without_the_password():
    from churnlib.errors import LogStoreError

    port = free_port()
    with pytest.raises(LogStoreError) as err:
        LogStore(f"postgresql://churn:sekret@127.0.0.1:{port}/log").migrate()
    message = str(err.value)
    assert message.startswith(f"prediction log unreachable at postgresql://churn:***@127.0.0.1:{port}/log: ")
    assert "sekret" not in message and "\n" not in message


def test_the_writer_batches_rows_into_sqlite_and_flushes_on_close(tmp_path):
    writer = LogWriter(f"sqlite:///{tmp_path / 'log.db'}", tmp_path / "spool", batch_rows=100, flush_interval_s=0.05)
    for k in range(30):
        writer.record(_answered(10 * k))
    counts = writer.close()
    # what close found buffered went to disk first (durable at once), then into the database
    assert counts["queued"] == 300 and counts["written"] + counts["replayed"] == 300
    assert counts["spooled"] >= counts["replayed"] and counts["dropped"] == counts["rejected"] == 0
    store = LogStore(f"sqlite:///{tmp_path / 'log.db'}")
    t = metadata.tables["predictions"]
    with store.engine.connect() as conn:
        got = conn.execute(sa.select(t).order_by(t.c.id)).mappings().all()
    assert [r["customer_id"] for r in got] == [str(i) for i in range(300)]
    assert [r["request_id"] for r in got] == [f"r{10 * (i // 10)}" for i in range(300)]
    first = got[17]
    assert first["probability"] == 0.17 and first["label"] == 0 and first["contact"] is False
    assert first["ts"] is not None and first["endpoint"] == "predict" and first["expected_value"] == 1.5
    np.testing.assert_array_equal(decode_features([r["features"] for r in got[:3]], 2), [[0, 1], [1, 1], [2, 1]])
    assert not (tmp_path / "spool").exists() or list((tmp_path / "spool").iterdir()) == []


def test_a_database_outage_under_load_loses_nothing_and_keeps_the_order(pg_log, tmp_path):
    """PostgreSQL cut for about 3 s while 4 threads record 2,000 rows: the rows answered during the
    outage go to the spool and are replayed when it is back; every row is in the log exactly once,
    in the order it was recorded; the caller never waited."""
    forwarder = Forwarder(("127.0.0.1", 5432))
    uri = f"postgresql://postgres@127.0.0.1:{forwarder.port}/{pg_log}"
    writer = LogWriter(uri, tmp_path / "spool", batch_rows=50, flush_interval_s=0.05, retry_s=0.5)
    order: list[str] = []
    lock = threading.Lock()
    slowest = [0.0]

    def client(c: int) -> None:
        for k in range(50):
            item = _answered(c * 10_000 + 10 * k)
            with lock:  # the order the rows were handed over
                started = time.perf_counter()
                writer.record(item)
                slowest[0] = max(slowest[0], time.perf_counter() - started)
                order.extend(item.customer_ids)
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    forwarder.cut()
    time.sleep(3.0)
    spooled_during = writer.counts["spooled"]
    forwarder.restore()
    for t in threads:
        t.join()
    assert writer.flush(60)
    deadline = time.monotonic() + 60
    while writer.spool.files() and time.monotonic() < deadline:
        time.sleep(0.1)
    counts = writer.close()
    assert spooled_during > 0 and counts["spooled"] >= spooled_during and counts["dropped"] == 0
    assert counts["queued"] == 2000 and counts["written"] + counts["replayed"] == 2000
    assert slowest[0] < 0.05  # a queue put, not a database round trip
    store = LogStore(f"postgresql://postgres@127.0.0.1:5432/{pg_log}")
    with store.engine.connect() as conn:
        logged = conn.execute(sa.text("SELECT prediction_id, customer_id FROM predictions ORDER BY id")).all()
    assert len(logged) == len({pid for pid, _ in logged}) == 2000
    assert [cid for _, cid in logged] == order
    store.close()


def test_a_file_whose_commit_was_cut_after_the_database_took_it_counts_once(tmp_path, pg_log):
    """The loader inserted a file, the database committed it, the answer was lost (the connection
    cut): the file is loaded again. Its rows are in the log once, and counted once, all of them
    (CI once saw 1,950 of 2,000 counted under an outage: the retried file's skipped rows were not)."""
    from churnlib.predlog.writer import Batch, _Ids

    uri = f"postgresql://postgres@127.0.0.1:5432/{pg_log}"
    store = LogStore(uri)
    store.migrate()
    folder = tmp_path / "spool" / "host-1-abcd"
    folder.mkdir(parents=True)
    ids = _Ids()
    first = Batch.of([_answered(0, 30), _answered(30, 20)], 0, ids)
    second = Batch.of([_answered(50, 25)], 1, ids)
    first.save(folder / "1-000000000000.npz")
    second.save(folder / "1-000000000001.npz")
    assert store.insert_prediction_rows(first.rows(False)) == 50  # the commit whose answer was cut
    store.close()
    res = subprocess.run([sys.executable, "-m", "churnlib.predlog.loader", "--dir", str(folder), "--poll-s", "0.05"],
                         cwd=REPO, env={**os.environ, "CHURN_LOADER_URI": uri}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events == [{"written": 50}, {"written": 25}]
    assert not list(folder.glob("*.npz"))
    store = LogStore(uri)
    with store.engine.connect() as conn:
        logged = conn.execute(sa.text("SELECT prediction_id, customer_id FROM predictions ORDER BY id")).all()
    store.close()
    assert len({pid for pid, _ in logged}) == len(logged) == 75
    assert [cid for _, cid in logged] == [str(i) for i in range(75)]


def test_a_dead_writers_spool_is_replayed_by_the_next(tmp_path, pg_log):
    """A process spools while the database is unreachable and dies without closing; the next writer
    on the machine adopts its spool and replays it before its own rows."""
    dead_uri = f"postgresql://postgres@127.0.0.1:{free_port()}/{pg_log}"
    code = f"""
import json, sys, time, os
sys.path.insert(0, {str(REPO)!r})
from tests.test_predlog import _answered
from churnlib.predlog.writer import LogWriter
w = LogWriter({dead_uri!r}, {str(tmp_path / 'spool')!r}, batch_rows=20, flush_interval_s=0.05, retry_s=60)
for k in range(6):
    w.record(_answered(10 * k))
w.flush(30)
print(w.counts["spooled"], flush=True)
os._exit(0)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "60", res.stderr
    _wait_unlocked(tmp_path / "spool")  # its loader (which shares the folder's lock) exits too
    writer = LogWriter(f"postgresql://postgres@127.0.0.1:5432/{pg_log}", tmp_path / "spool", flush_interval_s=0.05)
    writer.record(_answered(1000, n=1))
    assert writer.flush(60)
    counts = writer.close()
    assert counts["replayed"] == 60 and counts["written"] == 1
    store = LogStore(f"postgresql://postgres@127.0.0.1:5432/{pg_log}")
    with store.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text("SELECT customer_id FROM predictions ORDER BY id"))]
    assert ids == [str(i) for i in range(60)] + ["1000"]
    assert list((tmp_path / "spool").iterdir()) == []
    store.close()


def test_a_full_buffer_goes_to_disk_and_nothing_is_dropped(tmp_path):
    """The database unreachable (or slower than the traffic): a buffer of queue_max rows goes to the
    spool at once, nothing is dropped, memory stays bounded; what is left goes to disk on close."""
    dead_uri = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    writer = LogWriter(dead_uri, tmp_path / "spool", queue_max=10, flush_interval_s=5, retry_s=60)
    writer.record(_answered(0))  # 10 rows: the buffer is full, the spiller takes it
    deadline = time.monotonic() + 10
    while writer.counts["spooled"] < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.counts["spooled"] == 10 and writer._buffered == 0
    writer.record(_answered(11, n=1))
    counts = writer.close()
    assert counts["spooled"] == 11 and counts["dropped"] == 0 and counts["queued"] == 11
    assert writer.spool.rows() == 11  # left on disk for the next writer
    # which replays it, in order, once the database is there
    uri = f"sqlite:///{tmp_path / 'log.db'}"
    assert replay_orphans(uri, tmp_path / "spool") == 11 and replay_orphans(uri, tmp_path / "spool") == 0
    with LogStore(uri).engine.connect() as conn:
        assert [r[0] for r in conn.execute(sa.text("SELECT customer_id FROM predictions ORDER BY id"))] == [
            str(i) for i in [*range(10), 11]]


def test_what_a_stopping_server_finds_in_the_spool_is_loaded_within_its_time_or_said(tmp_path):
    """`churn serve`'s last step (``serving.runner.load_what_is_left``): rows the replicas' loaders
    had not loaded are loaded by the stopping process; past its deadline, or with the database
    down, they stay in the spool and one line says how many and where; the stop never raises."""
    from churnlib.predlog.writer import spooled_rows
    from churnlib.serving.runner import load_what_is_left

    dead_uri = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    writer = LogWriter(dead_uri, tmp_path / "spool", batch_rows=10, flush_interval_s=0.05, retry_s=60)
    for k in range(3):
        writer.record(_answered(10 * k))
        assert writer.flush(10, loaded=False)  # one file per request
    writer.close(timeout=0.5)
    _wait_unlocked(tmp_path / "spool")
    assert spooled_rows(tmp_path / "spool") == 30
    said: list[str] = []
    # the database down: nothing loaded, nothing lost, said in one line without a traceback
    assert load_what_is_left(dead_uri, str(tmp_path / "spool"), time.monotonic() + 5, said.append) == 0
    assert len(said) == 1 and "30 answered records wait in the spool" in said[0] and "\n" not in said[0]
    assert spooled_rows(tmp_path / "spool") == 30
    uri = f"sqlite:///{tmp_path / 'log.db'}"
    # the time already up: nothing loaded (a file is never started past the deadline)
    said.clear()
    assert load_what_is_left(uri, str(tmp_path / "spool"), time.monotonic() - 1, said.append) == 0
    assert spooled_rows(tmp_path / "spool") == 30 and "30 answered records wait" in said[0]
    # in time: every row, once, in answer order, and the spool empty
    said.clear()
    assert load_what_is_left(uri, str(tmp_path / "spool"), time.monotonic() + 30, said.append) == 30
    assert said == ["serve: the prediction log took the last 30 records its loaders had left in the spool"]
    assert spooled_rows(tmp_path / "spool") == 0
    with LogStore(uri).engine.connect() as conn:
        got = [r[0] for r in conn.execute(sa.text("SELECT customer_id FROM predictions ORDER BY id"))]
    assert got == [str(i) for i in range(30)]


def test_a_batch_still_loading_at_close_stays_on_disk_and_lands_once(tmp_path):
    """The database holds the loader's insert (another connection keeps SQLite's write lock) when
    the writer closes: the loader is stopped, its file stays in the spool; loaded later, every row
    is there once."""
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'log.db'}"
    LogStore(uri).migrate()
    blocker = sqlite3.connect(tmp_path / "log.db", timeout=1)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock: the loader's insert waits (busy timeout)
    writer = LogWriter(uri, tmp_path / "spool", flush_interval_s=0.05)
    writer.record(_answered(0, n=50))
    assert writer.flush(10, loaded=False)  # on disk
    time.sleep(1.0)  # the loader has taken the file and waits on the lock
    counts = writer.close(timeout=0.5)
    assert counts["queued"] == 50 and counts["written"] == 0 and counts["dropped"] == 0
    assert writer.spool.rows() == 50
    blocker.rollback()
    blocker.close()
    assert replay_orphans(uri, tmp_path / "spool") == 50
    with LogStore(uri).engine.connect() as conn:
        got = [r[0] for r in conn.execute(sa.text("SELECT customer_id FROM predictions ORDER BY id"))]
    assert got == [str(i) for i in range(50)]


def test_the_loader_is_a_process_of_its_own_and_a_dead_one_is_replaced(tmp_path):
    """The replica's process only writes the spool; loading runs in a child process, restarted when
    it dies (the rows wait on disk meanwhile)."""
    import os
    import signal

    uri = f"sqlite:///{tmp_path / 'log.db'}"
    writer = LogWriter(uri, tmp_path / "spool", flush_interval_s=0.05)
    first = writer._loader
    assert first.pid != os.getpid() and first.poll() is None
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    writer.record(_answered(0, n=20))
    assert writer.flush(30)
    assert writer._loader.pid != first.pid and writer._loader.poll() is None
    counts = writer.close()
    assert counts["written"] == 20 and LogStore(uri).count("predictions") == 20


def test_rows_are_dropped_only_when_the_disk_fails_too_and_counted(tmp_path):
    dead_uri = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    writer = LogWriter(dead_uri, tmp_path / "spool", flush_interval_s=0.05, retry_s=60)
    spool_dir = writer.spool.dir
    for f in spool_dir.iterdir():
        f.unlink()
    spool_dir.rmdir()
    spool_dir.write_text("not a folder")  # the spool cannot be written
    writer.record(_answered(0))
    assert writer.flush(30)
    counts = writer.close()
    assert counts["dropped"] == 10 and counts["spooled"] == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_outcomes_load_checks_every_row_and_twice_changes_nothing(backend, tmp_path, request):
    from tests.conftest import run_cli

    log_uri = (f"sqlite:///{tmp_path / 'log.db'}" if backend == "sqlite"
               else f"postgresql://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_log')}")
    data = tmp_path / "outcomes.csv"
    data.write_text("CustomerID,Churn,observed_at\n"
                    "17,1,2026-11-03\n"
                    "18,0,2026-11-04T10:00:00+01:00\n"
                    ",1,2026-11-05\n"                 # no id
                    "19,maybe,2026-11-05\n"           # neither class
                    "20,1,last tuesday\n"             # not a time
                    "21,true,2026-11-06T08:30:00\n"   # 1/0 targets take true/false too
                    "17,1,2026-11-03\n")              # the same outcome twice in the file
    common = ["--set", f"workspace={tmp_path / '.churn'}", "--set", f"monitoring.log_uri={log_uri}", "--json"]
    first = run_cli("outcomes", "load", "--data", str(data), *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert (out["rows"], out["loaded"], out["already_loaded"], out["rejected"]) == (7, 3, 0, 3)
    assert [r["row"] for r in out["rejects"]] == [3, 4, 5]
    assert out["rejects"][1]["reason"] == "'Churn': 'maybe' is neither 1 nor 0"
    assert out["rejects"][2]["reason"] == "'observed_at': 'last tuesday' is not a date or time"
    again = json.loads(run_cli("outcomes", "load", "--data", str(data), *common, cwd=tmp_path).stdout)
    assert (again["loaded"], again["already_loaded"]) == (0, 3)
    store = LogStore(log_uri)
    with store.engine.connect() as conn:
        t = metadata.tables["outcomes"]
        got = conn.execute(sa.select(t.c.customer_id, t.c.outcome, t.c.observed_at).order_by(t.c.customer_id)).all()
    assert [(c, o) for c, o, _ in got] == [("17", 1), ("18", 0), ("21", 1)]
    observed = {c: t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc) for c, _, t in got}
    assert observed["18"] == dt.datetime(2026, 11, 4, 9, 0, tzinfo=dt.timezone.utc)  # +01:00 -> UTC
    store.close()


def test_outcomes_bad_input_is_one_line_and_writes_nothing(tmp_path):
    from tests.conftest import run_cli

    common = ["--set", f"workspace={tmp_path / '.churn'}"]
    no_time = tmp_path / "no_time.csv"
    no_time.write_text("CustomerID,Churn\n17,1\n")
    res = run_cli("outcomes", "load", "--data", str(no_time), *common, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {no_time}: missing column(s) 'observed_at' (outcomes need the customer id, "
                                  "the outcome and when it was observed)")
    res = run_cli("outcomes", "load", "--data", str(tmp_path / "nope.csv"), *common, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == f"error: data path not found: {tmp_path / 'nope.csv'}"
    assert not (tmp_path / ".churn" / "prediction_log.db").exists()


def test_a_process_that_exits_without_closing_its_writer_loses_nothing(tmp_path):
    """Rows still queued (a 60 s flush interval holds them) when the process ends without close,
    as a Ray worker told to stop does: the writer's exit hook writes them."""
    uri = f"sqlite:///{tmp_path / 'log.db'}"
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tests.test_predlog import _answered
from churnlib.predlog.writer import LogWriter
w = LogWriter({uri!r}, {str(tmp_path / 'spool')!r}, flush_interval_s=60, batch_rows=100000)
for k in range(3):
    w.record(_answered(10 * k))
print(w.counts["written"], flush=True)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "0", res.stderr  # nothing written before the exit
    assert LogStore(uri).count("predictions") == 30
