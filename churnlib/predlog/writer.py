"""Recording predictions without making anyone wait: a buffer, a loader thread, a disk spool.

A Serve replica hands each request's answers to ``LogWriter.record`` as one
``Answered`` item (the arrays it already has: probabilities, labels, the
decision, the model matrix). ``record`` appends it to an in-memory buffer
under a lock and returns: no thread is woken per request, no row is made on
the request path.

The loader thread takes the whole buffer every ``flush_interval_s`` (at once
when it holds ``batch_rows``), makes it one columnar ``Batch`` (ids assigned,
one array per column; the matrix rows become bytes by a view, not a loop) and
inserts it with one driver-level ``executemany`` per transaction. A backlog
makes the batches larger, which is what lets the loader catch up.

The spool (a folder of this process's batches on disk, one fsynced ``.npz``
file per batch, columnar, named by the batch's sequence number) takes what
the database cannot take now: batches that failed (the database down or
unreachable), and, from a second thread, the buffer whenever it holds
``queue_max`` rows (the database slower than the traffic, or an insert
hanging). While the spool holds anything, the loader replays it, oldest file
first, before it takes new rows, deleting each file after its rows are
committed: rows reach the database in the order they were answered, and
memory stays bounded however long the database is away. Rows carry their
``prediction_id`` (made once, when the batch is made) and inserts skip ids
already present, so a batch whose commit was cut after the database took it
is not inserted twice. A batch the database refuses for what it holds (not for
being down) is kept aside in ``spool_dir/rejected`` and counted.

A process that dies leaves its spool folder behind; the next writer on that
machine takes it over (its lock is free) and replays it first
(``replay_orphans`` does the same for a reader, e.g. ``churn monitor``).
``close`` (a replica stopping gracefully) loads the buffer into the database,
or into the spool when the database is down or the time is up.

Counts (``queued``, ``written``, ``spooled``, ``replayed``, ``dropped``,
``rejected``) are kept and handed to ``on_count`` (Serve exports them as
Prometheus counters). A row is dropped only when it can go neither to the
database nor to the disk (the spool cannot be written): counted, never silent.
"""

from __future__ import annotations

import atexit
import datetime as dt
import fcntl
import json
import logging
import os
import socket
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
    def rejected(self) -> Path:
        return self.root / "rejected"

    def add(self, batch: Batch, rejected: bool = False) -> None:
        final = self.dir / f"1-{batch.seq:012d}.npz"
        if rejected:
            self.rejected.mkdir(exist_ok=True)
            final = self.rejected / f"{self.dir.name}-{batch.seq:012d}.npz"
        if final.exists():  # a part of this batch already here (the spill raced a failure): keep both
            final = final.with_name(f"{final.stem}-{uuid.uuid4().hex[:6]}.npz")
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
    """Rows in, batches out to the prediction log, the spool in between when the database fails
    or falls behind."""

    def __init__(self, uri: str, spool_dir: str | os.PathLike, batch_rows: int = 500, flush_interval_s: float = 0.5,
                 queue_max: int = 100_000, retry_s: float = 2.0,
                 on_count: Callable[[str, int], None] | None = None):
        self.store = LogStore(uri, connect_timeout_s=3)
        self._sqlite = self.store.dialect == "sqlite"
        self.spool = Spool(spool_dir)
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self.retry_s = retry_s
        self.on_count = on_count
        self.counts = dict.fromkeys(COUNTS, 0)
        self._count_lock = threading.Lock()
        self._buffer: list[Answered] = []
        self._buffered = 0  # rows in the buffer
        self._busy = 0  # rows taken by the loader, not yet in the database or the spool
        self._buffer_lock = threading.Lock()
        # held while the buffer is taken, and by the spill until its file is in place: the loader
        # never inserts a batch while an older one is still on its way to the spool
        self._take_lock = threading.Lock()
        self._ids = _Ids()
        self._seq = 0
        self._inflight: Batch | None = None  # the batch the loader is inserting
        self._migrated = False
        self._down_until = 0.0
        self._stopping = threading.Event()
        self._wake = threading.Event()  # the loader: a batch is ready, or stop
        self._spill = threading.Event()  # the spiller: the buffer is full, or stop
        self._closed = False
        self._released = False
        self._thread = threading.Thread(target=self._run, name="churn-prediction-log", daemon=True)
        self._spiller = threading.Thread(target=self._run_spill, name="churn-prediction-log-spill", daemon=True)
        self._thread.start()
        self._spiller.start()
        # A process that exits without close (a Ray worker told to stop by its node, SIGTERM, the
        # interpreter ending) spools what is still buffered: the next writer replays it.
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if not self._closed:
            self.close(timeout=5.0)  # durable within milliseconds; then loading for up to 5 s

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
        if before < self.batch_rows <= before + n:
            self._wake.set()
        if before < self.queue_max <= before + n:
            self._spill.set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every buffered row is in the database or the spool -> whether that happened
        in time."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            with self._buffer_lock:
                if self._buffered == 0 and self._busy == 0:
                    return True
            self._wake.set()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop taking rows; make what is buffered durable first (the spool: milliseconds, so a
        process killed soon after loses nothing), then let the loader load the spool into the
        database for up to ``timeout``; release the spool (what is left is the next writer's)
        -> the counts."""
        if self._closed:
            return dict(self.counts)
        with self._buffer_lock:
            self._closed = True
        atexit.unregister(self._at_exit)
        self._stopping.set()
        self._spill.set()
        self._spiller.join(1.0)
        # durable first: a batch the loader is inserting goes to disk (its commit may never come;
        # if it does, the replay skips its ids), then the buffer behind it; then the loader loads
        # the spool into the database for as long as it may
        inflight = self._inflight
        if inflight is not None:
            self._to_spool(inflight)
        self._spill_buffer()
        self._wake.set()
        self._thread.join(timeout)
        self._released = True  # a loader still stuck in an insert leaves the spool alone from now on
        left = len(self.spool.files())
        self.spool.close()
        self.store.close()
        logger.info("churn: prediction log writer closed: %s; %d spool file(s) left in %s for the next writer",
                    self.counts, left, self.spool.dir)
        return dict(self.counts)

    # The writer's side ---------------------------------------------------------------------

    def _take(self) -> Batch | None:
        """The whole buffer as one batch (call with ``_take_lock`` held)."""
        with self._buffer_lock:
            items, n = self._buffer, self._buffered
            if not items:
                return None
            self._buffer, self._buffered = [], 0
            self._busy += n
            self._seq += 1
            seq = self._seq
        self._count("queued", n)
        return Batch.of(items, seq, self._ids)

    def _done(self, batch: Batch) -> None:
        with self._buffer_lock:
            self._busy -= len(batch)

    def _to_spool(self, batch: Batch, rejected: bool = False) -> None:
        try:
            self.spool.add(batch, rejected=rejected)
        except OSError:
            logger.exception("churn: could not spool %d prediction rows", len(batch))
            self._count("dropped", len(batch))
        else:
            self._count("rejected" if rejected else "spooled", len(batch))

    def _spill_buffer(self) -> None:
        """The buffer to disk, in one file (the loader finds it in order)."""
        with self._take_lock:
            batch = self._take()
            if batch is not None:
                self._to_spool(batch)
                self._done(batch)

    def _run_spill(self) -> None:
        """Keep memory bounded: a full buffer goes to disk (the loader behind, or the database
        down and the buffer filling between retries)."""
        while not self._stopping.is_set():
            self._spill.wait(self.flush_interval_s)
            self._spill.clear()
            if self._stopping.is_set():
                return
            with self._buffer_lock:
                full = self._buffered >= self.queue_max
                down_and_waiting = self._buffered and time.monotonic() < self._down_until
            if full or down_and_waiting:
                try:
                    self._spill_buffer()
                except Exception:  # noqa: BLE001 - the thread must never die
                    logger.exception("churn: prediction log spill failed")

    def _run(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            if self._released:
                return
            try:
                if self.spool.files() and time.monotonic() >= self._down_until:
                    self._replay()
                    if not stopping:
                        continue
                with self._take_lock:
                    # the spool first: a batch spilled while we waited goes in before the buffer
                    batch = None if self.spool.files() else self._take()
                if batch is not None:
                    self._handle(batch)
                    continue
            except Exception:  # noqa: BLE001 - the thread must never die
                logger.exception("churn: prediction log writer failed")
                time.sleep(self.retry_s)
            if stopping:
                return
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_s
        logger.warning("churn: prediction log unavailable (%s); spooling to %s", str(exc).splitlines()[0][:200],
                       self.spool.dir)

    def _ready(self) -> bool:
        """The schema is there (migrated once per writer); False while the database is down."""
        if self._migrated:
            return True
        if time.monotonic() < self._down_until:
            return False
        try:
            self.store.migrate()
        except Exception as exc:  # noqa: BLE001 - any failure: spool and retry later
            self._failed(exc)
            return False
        self._migrated = True
        return True

    def _replay(self) -> bool:
        """Send the spool, oldest first -> whether it is empty now."""
        if not self._ready():
            return False
        for path in self.spool.files():
            if self._released:
                return False
            try:
                batch = self.spool.read(path)
            except (OSError, ValueError, KeyError) as exc:  # unreadable: kept aside, never retried
                logger.error("churn: spool file %s unreadable (%s); moved to %s", path, exc, self.spool.rejected)
                self.spool.rejected.mkdir(exist_ok=True)
                path.rename(self.spool.rejected / f"{self.spool.dir.name}-{path.name}")
                continue
            try:
                new = self.store.insert_prediction_rows(batch.rows(self._sqlite))
            except TRANSIENT as exc:
                self._failed(exc)
                return False
            except sa.exc.SQLAlchemyError as exc:  # the rows themselves: never retried, kept aside
                self._reject(batch, exc)
            else:
                self._count("replayed", new)  # rows already there (a commit that did land) skipped
            path.unlink()
            if self._stopping.is_set() and self._buffered:
                return False  # a stop: what is buffered goes to disk behind the rest, not waiting
        return True

    def _reject(self, batch: Batch, exc: BaseException) -> None:
        """A batch the database refuses for what it holds (not for being down): kept on disk,
        counted, and the log goes on."""
        logger.error("churn: the prediction log refused %d rows (%s); kept in %s", len(batch),
                     str(exc).splitlines()[0][:200], self.spool.rejected)
        self._to_spool(batch, rejected=True)

    def _handle(self, batch: Batch) -> None:
        self._inflight = batch
        try:
            if time.monotonic() >= self._down_until and self._ready():
                try:
                    self._count("written", self.store.insert_prediction_rows(batch.rows(self._sqlite)))
                    return
                except TRANSIENT as exc:
                    self._failed(exc)
                except sa.exc.SQLAlchemyError as exc:
                    self._reject(batch, exc)
                    return
            self._to_spool(batch)
        finally:
            self._inflight = None
            self._done(batch)


def replay_orphans(uri: str, spool_dir: str | os.PathLike) -> int:
    """Load what writers that are gone left in ``spool_dir`` into the log, oldest first -> how
    many rows (0 when there is nothing). For readers of the log (``churn monitor``) on the
    machine that served. A database that fails leaves the rest for the next writer."""
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
