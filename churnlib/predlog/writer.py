"""Recording predictions without making anyone wait: a buffer, a spool on disk, a loader process.

A Serve replica hands each request's answers to ``LogWriter.record`` as one
``Answered`` item (the arrays it already has: probabilities, labels, the
decision, the model matrix). ``record`` appends it to an in-memory buffer
under a lock and returns: no thread is woken per request, no row is made on
the request path.

A thread takes the whole buffer every ``flush_interval_s`` (at once when it
holds ``batch_rows``, or ``queue_max``) and writes it to the spool as one
columnar ``Batch`` (ids assigned, one array per column, the matrix rows as one
float32 array): one fsynced ``.npz`` file, named by its sequence number,
about 0.26 µs a row. That is all the replica does.

A loader process of its own (``churnlib.predlog.loader``, one per writer,
started with it) loads the spool into the database in multi-row INSERTs,
oldest file first, deleting each file after its rows are committed: the rows
reach the database in the order they were answered, whatever happens to it.
While the database is down (or slower than the traffic) the files wait on
disk and memory stays bounded; rows carry their ``prediction_id`` (made once,
with the batch) and inserts skip ids already present, so a file whose commit
was cut after the database took it is not inserted twice (and its rows are
counted once, when the file is gone). A batch the
database refuses for what it holds (not for being down) is moved to
``spool_dir/rejected`` and counted. Loading in the replica's own thread cost
the service about three times the loading's CPU (the two threads trading the
GIL); in a process of its own it costs its CPU only.

A process that dies leaves its spool folder behind; the next writer on that
machine takes it over (its lock is free) and its loader loads it first
(``replay_orphans`` does the same for a reader, e.g. ``churn monitor``).
``close`` (a replica stopping) writes the buffer to the spool first, then lets
the loader load for as long as it may.

Counts (``queued``, ``written``, ``spooled``, ``replayed``, ``dropped``,
``rejected``) are kept and handed to ``on_count`` (Serve exports them as
Prometheus counters): written = loaded at the first try, spooled = waiting on
disk because the database was down when their turn came, replayed = loaded
after that. A row is dropped only when it cannot be written to the disk:
counted, never silent.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import sqlalchemy as sa

from churnlib.errors import LogStoreError, first_line
from churnlib.predlog.store import LogStore

logger = logging.getLogger(__name__)

COUNTS = ("queued", "written", "spooled", "replayed", "dropped", "rejected")
# the database is down or unreachable (spool and retry), as opposed to refusing the rows themselves
TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError, OSError)


@dataclass
class Answered:
    """One request's answers, as the request path hands them over: a single queue item, whatever
    the number of records (the rows are made on the writer's thread)."""
    ts: dt.datetime
    request_id: str
    model_name: str
    model_version: str
    route: str
    endpoint: str
    customer_ids: list[Any]
    probability: np.ndarray
    label: np.ndarray
    contact: np.ndarray | None
    expected_value: np.ndarray | None
    X: np.ndarray  # the model matrix the answers came from
    latency_ms: float | None = None  # the request's model time

    def __len__(self) -> int:
        return len(self.probability)


def _text(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


class _Ids:
    """Prediction ids: this writer's random prefix and a counter (unique, increasing, cheap)."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:20]
        self.next = 0

    def take(self, n: int) -> int:
        start, self.next = self.next, self.next + n
        return start


class Batch:
    """Answered items made columnar: what the loader inserts and what a spool file holds.

    Per item (request): its time, request id, model, route, endpoint, number of
    rows, matrix width and which optional columns it has; per row: the customer
    id and one array per answer column; the matrix rows as one float32 array.
    Prediction ids are the batch's prefix and a run of counters."""

    def __init__(self, seq: int, prefix: str, start: int, items: list[list], customer_id: list,
                 probability: np.ndarray, label: np.ndarray, contact: np.ndarray, expected_value: np.ndarray,
                 features: np.ndarray):
        self.seq, self.prefix, self.start, self.items = seq, prefix, start, items
        self.customer_id, self.probability, self.label = customer_id, probability, label
        self.contact, self.expected_value, self.features = contact, expected_value, features

    def __len__(self) -> int:
        return len(self.probability)

    @classmethod
    def of(cls, answered: list[Answered], seq: int, ids: _Ids) -> "Batch":
        items, cids, probability, label, contact, value, features = [], [], [], [], [], [], []
        for a in answered:
            n = len(a)
            X = np.ascontiguousarray(a.X, dtype="<f4").reshape(n, -1)
            items.append([a.ts.isoformat(), _text(a.request_id, 64), _text(a.model_name, 256),
                          _text(a.model_version, 64), _text(a.route, 32), _text(a.endpoint, 32), n, X.shape[1],
                          a.contact is not None, a.expected_value is not None, a.latency_ms])
            cids.extend(None if c is None else str(c)[:128] for c in a.customer_ids)
            probability.append(np.asarray(a.probability, dtype=np.float64).ravel())
            label.append(np.asarray(a.label, dtype=np.int64).ravel())
            if a.contact is not None:
                contact.append(np.asarray(a.contact, dtype=bool).ravel())
            if a.expected_value is not None:
                value.append(np.asarray(a.expected_value, dtype=np.float64).ravel())
            features.append(X.ravel())

        def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

        total = sum(item[6] for item in items)
        return cls(seq, ids.prefix, ids.take(total), items, cids, cat(probability, np.float64), cat(label, np.int64),
                   cat(contact, bool), cat(value, np.float64), cat(features, "<f4"))

    def rows(self, sqlite: bool) -> list[tuple]:
        """Row tuples in ``PREDICTION_COLUMNS`` order (per-item values repeated by list
        multiplication, the matrix rows as bytes through a void view: no Python loop per field)."""
        ts, request_id, name, version, route, endpoint, contact, value, features, latency = ([] for _ in range(10))
        c = v = f = 0
        contacts, values = self.contact.tolist(), self.expected_value.tolist()
        for when, rid, model, ver, rte, ep, n, width, has_contact, has_value, *rest in self.items:
            stamp = dt.datetime.fromisoformat(when)
            if sqlite:  # SQLAlchemy's own text form of a DateTime there: naive UTC
                stamp = stamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
            for column, one in ((ts, stamp), (request_id, rid), (name, model), (version, ver), (route, rte),
                                (endpoint, ep), (latency, rest[0] if rest else None)):
                column.extend([one] * n)
            if has_contact:
                contact.extend(contacts[c: c + n])
                c += n
            else:
                contact.extend([None] * n)
            if has_value:
                value.extend(values[v: v + n])
                v += n
            else:
                value.extend([None] * n)
            block = self.features[f: f + n * width].reshape(n, width) if width else np.zeros((n, 0), "<f4")
            features.extend(np.ascontiguousarray(block).view(np.dtype((np.void, 4 * width))).ravel().tolist()
                            if width else [b""] * n)
            f += n * width
        pids = [f"{self.prefix}{i:012x}" for i in range(self.start, self.start + len(self))]
        return list(zip(pids, ts, request_id, self.customer_id, name, version, route, endpoint,
                        self.probability.tolist(), self.label.tolist(), contact, value, features, latency))

    # On disk: one .npz (no pickles), the per-item and per-row text as JSON beside the arrays

    def save(self, path: Path) -> None:
        meta = json.dumps({"seq": self.seq, "prefix": self.prefix, "start": self.start, "items": self.items,
                           "customer_id": self.customer_id}).encode()
        with open(path, "wb") as fh:
            np.savez(fh, meta=np.frombuffer(meta, dtype=np.uint8), probability=self.probability, label=self.label,
                     contact=self.contact, expected_value=self.expected_value, features=self.features)
            fh.flush()
            os.fsync(fh.fileno())

    @classmethod
    def load(cls, path: Path) -> "Batch":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            return cls(meta["seq"], meta["prefix"], meta["start"], meta["items"], meta["customer_id"],
                       z["probability"], z["label"], z["contact"], z["expected_value"], z["features"])


class Spool:
    """This process's spool folder: batches as files named by sequence number, replayed in order;
    orphans of dead processes adopted (theirs first)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = self.root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self._lock = open(self.dir / "lock", "w")  # held while this process lives
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.adopted = self._adopt()

    def _adopt(self) -> int:
        """Take over the folders of writers that are gone (their lock is free): their files replay
        first -> how many files."""
        taken = 0
        for other in sorted(p for p in self.root.iterdir() if p.is_dir() and p not in (self.dir, self.rejected)):
            lock_path = other / "lock"
            try:
                fh = open(lock_path, "a")
            except OSError:
                continue
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # alive
                fh.close()
                continue
            for f in sorted(other.glob("*.npz")):
                f.rename(self.dir / f"0-{other.name}-{f.name}")
                taken += 1
            for leftover in other.glob("*.tmp"):
                leftover.unlink()  # never renamed into place: its batch was not spooled
            lock_path.unlink()
            fh.close()
            try:
                other.rmdir()
            except OSError:  # something else in it: left for a person to look at
                logger.warning("churn: left %s in place (not a spool file)", other)
        return taken

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.npz"))

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the folder's lock (a loader process inherits it: the folder
        stays locked while either works on it)."""
        return self._lock.fileno()

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def add(self, batch: Batch) -> None:
        """One batch as one file, in place only once complete (fsynced, then renamed)."""
        final = self.dir / f"1-{batch.seq:012d}.npz"
        tmp = final.with_suffix(".tmp")
        try:
            batch.save(tmp)
            tmp.rename(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def read(path: Path) -> Batch:
        return Batch.load(path)

    def rows(self) -> int:
        return sum(len(self.read(f)) for f in self.files())

    def close(self) -> None:
        """Release the folder: removed when empty, else left (locked no more) for the next writer."""
        if not self.files():
            try:
                (self.dir / "lock").unlink(missing_ok=True)
                self.dir.rmdir()
            except OSError:  # the folder gone or not a folder any more (what made the spool fail)
                pass
        self._lock.close()


class LogWriter:
    """Rows in, columnar batches out to the spool; a loader process of its own takes them into the
    database (``churnlib.predlog.loader``)."""

    def __init__(self, uri: str, spool_dir: str | os.PathLike, batch_rows: int = 500, flush_interval_s: float = 0.5,
                 queue_max: int = 100_000, retry_s: float = 2.0,
                 on_count: Callable[[str, int], None] | None = None, close_timeout_s: float = 5.0):
        LogStore(uri).close()  # a URI that is not one: one line now, not in the loader later
        self.uri = uri
        self.spool = Spool(spool_dir)
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self.retry_s = retry_s
        self.on_count = on_count
        self.close_timeout_s = close_timeout_s  # loading at an exit without close (see _at_exit)
        self.counts = dict.fromkeys(COUNTS, 0)
        self.down: str | None = None  # why the database is unavailable, as the loader last said
        self._count_lock = threading.Lock()
        self._buffer: list[Answered] = []
        self._buffered = 0  # rows in the buffer
        self._busy = 0  # rows taken from the buffer, not yet in the spool
        self._buffer_lock = threading.Lock()
        self._take_lock = threading.Lock()  # one batch made and written at a time: files in answer order
        self._ids = _Ids()
        self._seq = 0
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        self._loader: subprocess.Popen | None = None
        self._loader_lock = threading.Lock()
        self._start_loader()
        self._thread = threading.Thread(target=self._run, name="churn-prediction-log", daemon=True)
        self._thread.start()
        # A process that exits without close (a Ray worker told to stop by its node, SIGTERM, the
        # interpreter ending) writes what is still buffered to the spool.
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if not self._closed:
            self.close(timeout=self.close_timeout_s)  # durable within milliseconds; then loading

    def _count(self, kind: str, n: int) -> None:
        if n <= 0:
            return
        with self._count_lock:
            self.counts[kind] += n
        if self.on_count is not None:
            try:
                self.on_count(kind, n)
            except Exception:  # noqa: BLE001 - a metric must never stop the writer
                logger.exception("churn: prediction log counter failed")

    # The loader process ----------------------------------------------------------------------

    def _start_loader(self) -> None:
        env = {**os.environ, "CHURN_LOADER_URI": self.uri}
        root = str(Path(__file__).resolve().parents[2])  # churnlib importable in the child as here
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._loader = subprocess.Popen(
            [sys.executable, "-m", "churnlib.predlog.loader", "--dir", str(self.spool.dir),
             "--retry-s", str(self.retry_s), "--poll-s", str(min(self.flush_interval_s, 0.2))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
            pass_fds=(self.spool.lock_fd,), start_new_session=True)  # the folder stays locked while it works
        self._reader = threading.Thread(target=self._read_loader, args=(self._loader,),
                                        name="churn-prediction-log-counts", daemon=True)
        self._reader.start()

    def _read_loader(self, proc: subprocess.Popen) -> None:
        """The loader's events -> the counters."""
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "down" in event:
                self.down = event["down"]
                logger.warning("churn: prediction log unavailable (%s); records wait in %s", event["down"],
                               self.spool.dir)
            for kind in ("written", "spooled", "replayed", "rejected"):
                if kind in event:
                    if kind in ("written", "replayed"):
                        self.down = None
                    if kind == "rejected":
                        logger.error("churn: the prediction log refused a batch (%s); kept in %s",
                                     event.get("reason") or event.get("unreadable"), self.spool.rejected)
                    self._count(kind, int(event[kind]))

    def _check_loader(self, closing: bool = False) -> None:
        """A loader that died (killed, out of memory; Ray kills a stopping worker's children) is
        started again: the spool waits for it."""
        with self._loader_lock:
            if self._loader is not None and self._loader.poll() is not None and (
                    closing or not self._stopping.is_set()):
                code = self._loader.returncode
                # -9 when a stopping Ray worker's children are killed: expected then, started again
                (logger.info if code == -9 else logger.error)(
                    "churn: the prediction log's loader exited (%s); starting another", code)
                self._start_loader()

    # The caller's side ---------------------------------------------------------------------

    def record(self, answered: Answered) -> None:
        """Buffer one request's answers for the log: an append under a lock; never blocks on the
        database or the disk, never raises."""
        n = len(answered)
        if not n:
            return
        with self._buffer_lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._buffer.append(answered)
                before = self._buffered
                self._buffered = before + n
        if closed:  # after close: nowhere to go (counted)
            self._count("dropped", n)
            return
        if before < min(self.batch_rows, self.queue_max) <= before + n:
            self._wake.set()

    def flush(self, timeout: float = 30.0, loaded: bool = True) -> bool:
        """Wait until every buffered row is in the spool and, with ``loaded``, the spool is loaded
        (or the database is down) -> whether that happened in time."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            with self._buffer_lock:
                journaled = self._buffered == 0 and self._busy == 0
            if journaled and (not loaded or not self.spool.files() or self.down is not None):
                return True
            self._wake.set()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop taking rows; what is buffered goes to the spool first (milliseconds: a process
        killed soon after loses nothing); the loader loads the spool for up to ``timeout`` and
        stops (what is left is the next writer's) -> the counts."""
        if self._closed:
            return dict(self.counts)
        with self._buffer_lock:
            self._closed = True
        atexit.unregister(self._at_exit)
        self._stopping.set()
        self._wake.set()
        self._thread.join(2.0)
        self._journal()  # whatever the thread did not take
        self._check_loader(closing=True)  # a live loader to load it
        loader = self._loader
        if loader is not None:
            try:
                loader.stdin.close()  # "load what is there, then exit"
            except OSError:
                pass
            try:
                loader.wait(timeout)
            except subprocess.TimeoutExpired:
                loader.terminate()  # after the file it is loading
                try:
                    loader.wait(5.0)
                except subprocess.TimeoutExpired:
                    loader.kill()  # stuck in the database: its file stays, its ids make a replay safe
                    loader.wait()
            self._reader.join(2.0)  # its last counts
        left = len(self.spool.files())
        self.spool.close()
        logger.info("churn: prediction log writer closed: %s; %d spool file(s) left in %s for the next writer",
                    self.counts, left, self.spool.dir)
        return dict(self.counts)

    # The writer's side ---------------------------------------------------------------------

    def _journal(self) -> None:
        """The buffer as one batch, into the spool (one fsynced file; dropped, counted, only when
        the disk refuses it)."""
        with self._take_lock:
            with self._buffer_lock:
                items, n = self._buffer, self._buffered
                if not items:
                    return
                self._buffer, self._buffered = [], 0
                self._busy += n
                self._seq += 1
                seq = self._seq
            self._count("queued", n)
            try:
                self.spool.add(Batch.of(items, seq, self._ids))
            except OSError:
                logger.exception("churn: could not spool %d prediction rows", n)
                self._count("dropped", n)
            finally:
                with self._buffer_lock:
                    self._busy -= n

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self._journal()
                self._check_loader()
            except Exception:  # noqa: BLE001 - the thread must never die
                logger.exception("churn: prediction log writer failed")


def replay_orphans(uri: str, spool_dir: str | os.PathLike, until: float | None = None) -> int:
    """Load what writers that are gone left in ``spool_dir`` into the log, oldest first -> how
    many rows (0 when there is nothing). For readers of the log (``churn monitor``) on the
    machine that served, and for `churn serve` as it stops. A database that fails, or
    ``time.monotonic()`` past ``until`` before a file, leaves the rest for the next writer."""
    root = Path(spool_dir)
    if not root.is_dir() or not any(p.is_dir() and p.name != "rejected" for p in root.iterdir()):
        return 0
    spool = Spool(root)
    store = LogStore(uri)
    done = 0
    try:
        if spool.files():
            store.migrate()
            for path in spool.files():
                if until is not None and time.monotonic() > until:
                    break
                batch = spool.read(path)
                try:
                    store.insert_prediction_rows(batch.rows(store.dialect == "sqlite"))
                except sa.exc.SQLAlchemyError as exc:
                    raise LogStoreError(f"prediction log at {store.describe()}: could not load the spool "
                                        f"{path}: {first_line(exc)}") from None
                path.unlink(missing_ok=True)
                done += len(batch)
    finally:
        spool.close()
        store.close()
    return done


def spooled_rows(spool_dir: str | os.PathLike) -> int:
    """Rows waiting on disk in ``spool_dir``, in every writer's folder (the rejected aside)."""
    root = Path(spool_dir)
    if not root.is_dir():
        return 0
    n = 0
    for path in root.glob("*/*.npz"):
        if path.parent.name == "rejected":
            continue
        with contextlib.suppress(OSError, ValueError, KeyError), np.load(path, allow_pickle=False) as z:
            n += len(z["probability"])
    return n
