"""Recording predictions without making anyone wait: a queue, a background writer, a disk spool.

A Serve replica hands each request's answers to ``LogWriter.record`` as one
``Answered`` item (the arrays it already has: probabilities, labels, the
decision, the model matrix; a queue put, microseconds, whatever the number of
records) and goes on. One thread per process takes items off the queue, makes
the rows (ids, the matrix rows as bytes) and inserts them in batches
(``batch_rows`` rows or ``flush_interval_s``, whichever comes first; a backlog
makes the batches larger, so that the writer catches up) with one driver-level
``executemany`` per transaction.

When the database fails (down, unreachable, a network cut), the batch is
written to the spool instead: a JSON-lines file per batch, fsynced and renamed
into place, in this process's own folder under ``spool_dir``. While the spool
holds anything, new batches go behind it, and every ``retry_s`` the writer
replays the spool, oldest file first, deleting each file after its rows are
committed: the rows reach the database in the order they were answered. Rows
carry their ``prediction_id`` (made once, before the first insert) and inserts
skip ids already present, so a batch whose commit was cut after the database
took it is not inserted twice. A batch the database refuses for what it holds
(not for being down) is kept aside in ``spool_dir/rejected`` and counted.

A process that dies leaves its spool folder behind; the next writer on that
machine takes it over (its lock is free) and replays it first. ``close`` (a
replica stopping gracefully) drains the queue into the database, or into the
spool when the database is down.

Counts (``queued``, ``written``, ``spooled``, ``replayed``, ``dropped``,
``rejected``) are kept and handed to ``on_count`` (Serve exports them as
Prometheus counters). A row is dropped only when the queue already holds
``queue_max`` rows (the database and the disk both too slow for the traffic):
counted, never silent.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import sqlalchemy as sa

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

    def __len__(self) -> int:
        return len(self.probability)


def _text(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


class _Ids:
    """Prediction ids: this writer's random prefix and a counter (unique, increasing, cheap)."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:20]
        self.next = 0

    def take(self, n: int) -> list[str]:
        start, self.next = self.next, self.next + n
        return [f"{self.prefix}{i:012x}" for i in range(start, start + n)]


def expand(items: list[Answered], ids: _Ids) -> list[tuple]:
    """Queue items -> row tuples in ``PREDICTION_COLUMNS`` order, ids assigned once, here."""
    rows: list[tuple] = []
    for a in items:
        n = len(a)
        if n == 0:
            continue
        X = np.ascontiguousarray(a.X, dtype="<f4")
        contact = a.contact.tolist() if a.contact is not None else [None] * n
        value = a.expected_value.tolist() if a.expected_value is not None else [None] * n
        request_id, name, version = _text(a.request_id, 64), _text(a.model_name, 256), _text(a.model_version, 64)
        route, endpoint = _text(a.route, 32), _text(a.endpoint, 32)
        for pid, cid, p, label, c, v, x in zip(ids.take(n), a.customer_ids, a.probability.tolist(), a.label.tolist(),
                                               contact, value, X):
            rows.append((pid, a.ts, request_id, _text(cid, 128), name, version, route, endpoint, p, int(label),
                         None if c is None else bool(c), v, x.tobytes()))
    return rows


def _spool_line(row: tuple) -> str:
    out = list(row)
    out[1] = row[1].isoformat()
    out[12] = base64.b64encode(row[12]).decode()
    return json.dumps(out)


def _spool_row(line: str) -> tuple:
    row = json.loads(line)
    row[1] = dt.datetime.fromisoformat(row[1])
    row[12] = base64.b64decode(row[12])
    return tuple(row)


class Spool:
    """This process's spool folder: batches as files, replayed in order; orphans of dead processes adopted."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = self.root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self._lock = open(self.dir / "lock", "w")  # held while this process lives
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._seq = 0
        self._adopt()

    def _adopt(self) -> None:
        """Take over the folders of writers that are gone (their lock is free): their files replay first."""
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
            for f in sorted(other.glob("*.jsonl")):
                f.rename(self.dir / f"0-{other.name}-{f.name}")
            for leftover in other.glob("*.tmp"):
                leftover.unlink()  # never renamed into place: its batch was not spooled
            lock_path.unlink()
            fh.close()
            other.rmdir()

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl"))

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def add(self, rows: list[tuple], rejected: bool = False) -> None:
        self._seq += 1
        final = self.dir / f"1-{self._seq:012d}.jsonl"
        if rejected:
            self.rejected.mkdir(exist_ok=True)
            final = self.rejected / f"{self.dir.name}-{self._seq:012d}.jsonl"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(_spool_line(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(final)

    @staticmethod
    def read(path: Path) -> list[tuple]:
        with open(path, encoding="utf-8") as fh:
            return [_spool_row(line) for line in fh if line.strip()]

    def rows(self) -> int:
        return sum(len(self.read(f)) for f in self.files())

    def close(self) -> None:
        """Release the folder: removed when empty, else left (locked no more) for the next writer."""
        if not self.files():
            (self.dir / "lock").unlink(missing_ok=True)
            self._lock.close()
            try:
                self.dir.rmdir()
            except OSError:
                pass
        else:
            self._lock.close()


class LogWriter:
    """Rows in, batches out to the prediction log, the spool in between when the database fails."""

    def __init__(self, uri: str, spool_dir: str | os.PathLike, batch_rows: int = 500, flush_interval_s: float = 0.5,
                 queue_max: int = 100_000, retry_s: float = 2.0,
                 on_count: Callable[[str, int], None] | None = None):
        self.store = LogStore(uri, connect_timeout_s=3)
        self.spool = Spool(spool_dir)
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self.retry_s = retry_s
        self.on_count = on_count
        self.counts = dict.fromkeys(COUNTS, 0)
        self._count_lock = threading.Lock()
        self._queue: queue.Queue[Answered] = queue.Queue()
        self._ids = _Ids()
        self._pending = 0
        self._migrated = False
        self._down_until = 0.0
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="churn-prediction-log", daemon=True)
        self._thread.start()
        # A process that exits without close (a Ray worker told to stop by its node, SIGTERM, the
        # interpreter ending) spools what is still queued: the next writer replays it.
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if not self._closed:
            self.close(timeout=2.0)

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
        """Queue one request's answers for the log (one item whatever their number); never
        blocks, never raises."""
        n = len(answered)
        if not n:
            return
        with self._count_lock:
            full = self._pending + n > self.queue_max or self._stopping.is_set()
            if not full:
                self._pending += n
        if full:
            self._count("dropped", n)
            return
        self._idle.clear()
        self._queue.put(answered)
        self._count("queued", n)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued row is in the database or the spool -> whether that happened in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._count_lock:
                if self._pending == 0 and self._idle.is_set():
                    return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop taking rows, write (or spool) what is queued, release the spool -> the counts."""
        if self._closed:
            return dict(self.counts)
        self._closed = True
        atexit.unregister(self._at_exit)
        self._stopping.set()
        self._thread.join(timeout)
        # rows that raced the stop (queued as it was set), or that the thread had no time for
        items: list[Answered] = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        left = expand(items, self._ids)
        if left:
            try:
                self.spool.add(left)
                self._count("spooled", len(left))
            except OSError:
                self._count("dropped", len(left))
        self.spool.close()
        self.store.close()
        return dict(self.counts)

    # The writer's side ---------------------------------------------------------------------

    def _get(self, timeout: float) -> Answered | None:
        """The next queued rows, waiting at most ``timeout`` in short slices, so that a stop is
        seen at once (then only what is already queued is taken)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if self._stopping.is_set() or left <= 0:
                    return self._queue.get_nowait()
                return self._queue.get(timeout=min(left, 0.05))
            except queue.Empty:
                if self._stopping.is_set() or time.monotonic() >= deadline:
                    return None

    def _take(self) -> list[Answered]:
        """Items for one batch: up to batch_rows rows, waiting at most flush_interval_s after the
        first (on a stop, at once: what is queued). A backlog makes the batches as large as it is:
        one transaction for many rows is what lets the writer catch up."""
        items: list[Answered] = []
        first = self._get(self.flush_interval_s)
        if first is None:
            return items
        items.append(first)
        n = len(first)
        deadline = time.monotonic() + self.flush_interval_s
        while n < self.batch_rows or not self._queue.empty() and n < 50 * self.batch_rows:
            more = self._get(max(deadline - time.monotonic(), 0.0) if n < self.batch_rows else 0.0)
            if more is None:
                break
            items.append(more)
            n += len(more)
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items:
                rows = expand(items, self._ids)
                self._handle(rows)
                with self._count_lock:
                    self._pending -= sum(len(a) for a in items)
            elif self.spool.files() and time.monotonic() >= self._down_until:
                self._replay()
            if self._queue.empty():
                self._idle.set()
                if self._stopping.is_set():
                    if self.spool.files() and time.monotonic() >= self._down_until:
                        self._replay()  # a last try: the database may be back
                    return

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
            rows = self.spool.read(path)
            try:
                self.store.insert_prediction_rows(rows)
            except TRANSIENT as exc:
                self._failed(exc)
                return False
            except sa.exc.SQLAlchemyError as exc:  # the rows themselves: never retried, kept aside
                self._reject(rows, exc)
            else:
                self._count("replayed", len(rows))
            path.unlink()
        return True

    def _reject(self, rows: list[tuple], exc: BaseException) -> None:
        """A batch the database refuses for what it holds (not for being down): kept on disk,
        counted, and the log goes on."""
        logger.error("churn: the prediction log refused %d rows (%s); kept in %s", len(rows),
                     str(exc).splitlines()[0][:200], self.spool.rejected)
        try:
            self.spool.add(rows, rejected=True)
        except OSError:
            pass
        self._count("rejected", len(rows))

    def _handle(self, rows: list[tuple]) -> None:
        down = time.monotonic() < self._down_until
        if not down and (not self.spool.files() or self._replay()) and self._ready():
            try:
                self.store.insert_prediction_rows(rows)
                self._count("written", len(rows))
                return
            except TRANSIENT as exc:
                self._failed(exc)
            except sa.exc.SQLAlchemyError as exc:
                self._reject(rows, exc)
                return
        try:
            self.spool.add(rows)
            self._count("spooled", len(rows))
        except OSError:
            logger.exception("churn: could not spool %d prediction rows", len(rows))
            self._count("dropped", len(rows))
