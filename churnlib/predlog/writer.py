"""Recording predictions without making anyone wait: a queue, a background writer, a disk spool.

A Serve replica hands each answer's rows to ``LogWriter.record`` (a queue put,
microseconds) and goes on. One thread per process takes rows off the queue in
batches (``batch_rows`` rows or ``flush_interval_s``, whichever comes first)
and inserts each batch in one transaction.

When the database fails (down, unreachable, a network cut), the batch is
written to the spool instead: a JSON-lines file per batch, fsynced and renamed
into place, in this process's own folder under ``spool_dir``. While the spool
holds anything, new batches go behind it, and every ``retry_s`` the writer
replays the spool, oldest file first, deleting each file after its rows are
committed: the rows reach the database in the order they were answered. Rows
carry their ``prediction_id`` and inserts skip ids already present, so a batch
whose commit was cut after the database took it is not inserted twice.

A process that dies leaves its spool folder behind; the next writer on that
machine takes it over (its lock is free) and replays it first. ``close`` (a
replica stopping gracefully) drains the queue into the database, or into the
spool when the database is down.

Counts (``queued``, ``written``, ``spooled``, ``replayed``, ``dropped``) are
kept and handed to ``on_count`` (Serve exports them as Prometheus counters). A
row is dropped only when the queue already holds ``queue_max`` rows (the
database and the disk both too slow for the traffic): counted, never silent.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from churnlib.predlog.store import LogStore

logger = logging.getLogger(__name__)

COUNTS = ("queued", "written", "spooled", "replayed", "dropped")


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}


def _features_as_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The raw records as JSON text, encoded here on the writer's thread, not on the caller's."""
    for row in rows:
        if not isinstance(row["features"], str):
            row["features"] = json.dumps(row["features"], default=str)
    return rows


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["ts"] = dt.datetime.fromisoformat(out["ts"])
    return out


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
        for other in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.dir):
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

    def add(self, rows: list[dict[str, Any]]) -> None:
        self._seq += 1
        final = self.dir / f"1-{self._seq:012d}.jsonl"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(_encode(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(final)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as fh:
            return [_decode(json.loads(line)) for line in fh if line.strip()]

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
        self._queue: queue.Queue[list[dict[str, Any]]] = queue.Queue()
        self._pending = 0
        self._migrated = False
        self._down_until = 0.0
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn-prediction-log", daemon=True)
        self._thread.start()

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

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Queue rows for the log; never blocks, never raises."""
        if not rows:
            return
        with self._count_lock:
            full = self._pending + len(rows) > self.queue_max or self._stopping.is_set()
            if not full:
                self._pending += len(rows)
        if full:
            self._count("dropped", len(rows))
            return
        self._idle.clear()
        self._queue.put(rows)
        self._count("queued", len(rows))

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
        self._stopping.set()
        self._thread.join(timeout)
        # rows that raced the stop (queued as it was set), or that the thread had no time for
        left: list[dict[str, Any]] = []
        while True:
            try:
                left.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        if left:
            try:
                self.spool.add(_features_as_json(left))
                self._count("spooled", len(left))
            except OSError:
                self._count("dropped", len(left))
        self.spool.close()
        self.store.close()
        return dict(self.counts)

    # The writer's side ---------------------------------------------------------------------

    def _get(self, timeout: float) -> list[dict[str, Any]] | None:
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

    def _take(self) -> list[dict[str, Any]]:
        """Rows for one batch: up to batch_rows, waiting at most flush_interval_s after the first
        (on a stop, at once: what is queued)."""
        rows: list[dict[str, Any]] = []
        first = self._get(self.flush_interval_s)
        if first is None:
            return rows
        rows.extend(first)
        deadline = time.monotonic() + self.flush_interval_s
        while len(rows) < self.batch_rows:
            more = self._get(max(deadline - time.monotonic(), 0.0))
            if more is None:
                break
            rows.extend(more)
        return rows

    def _run(self) -> None:
        while True:
            rows = self._take()
            if rows:
                self._handle(_features_as_json(rows))
                with self._count_lock:
                    self._pending -= len(rows)
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
                self.store.insert_predictions(rows)
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                self._failed(exc)
                return False
            path.unlink()
            self._count("replayed", len(rows))
        return True

    def _handle(self, rows: list[dict[str, Any]]) -> None:
        down = time.monotonic() < self._down_until
        if not down and (not self.spool.files() or self._replay()) and self._ready():
            try:
                self.store.insert_predictions(rows)
                self._count("written", len(rows))
                return
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                self._failed(exc)
        try:
            self.spool.add(rows)
            self._count("spooled", len(rows))
        except OSError:
            logger.exception("churn: could not spool %d prediction rows", len(rows))
            self._count("dropped", len(rows))
