"""The prediction log's loader: a process of its own per writer, loading its spool into the database.

    CHURN_LOADER_URI=<uri> python -m churnlib.predlog.loader --dir <spool folder> [--retry-s 2] [--poll-s 0.2]

A Serve replica's writer (``churnlib.predlog.writer.LogWriter``) only appends
batches to its spool folder (columnar ``.npz`` files named in answer order);
this process loads them, oldest first, and deletes each file after its rows
are committed. In a process of its own, the per-row work of an insert (making
the row tuples, binding the values) never competes with the replica's
serving thread for the GIL: in the replica's own thread it cost the service
about three times its own CPU (measured: ~13 µs a row of loading took ~44 µs
a row from the serving thread).

The URI comes in the environment (a password never shows in ``ps``). One JSON
line per event on stdout, read by the writer for its counters:
``{"written": n}`` (loaded at the first try), ``{"spooled": n}`` (the database
was down when its turn came: it waits on disk), ``{"replayed": n}`` (loaded
later), ``{"rejected": n}`` (refused for what it holds: moved to ``rejected``).
``{"down": "..."}`` says why the database is unavailable (once per outage).

It stops when stdin closes (the writer closing, or gone): after loading what
is there, or at once on SIGTERM (after the file it is loading; what is left
stays for the next writer). The writer's lock on the folder is inherited, so
nobody adopts the folder while this process works on it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from churnlib.errors import first_line
from churnlib.predlog.store import LogStore
from churnlib.predlog.writer import TRANSIENT, Batch


def _emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def run(folder: Path, uri: str, retry_s: float, poll_s: float) -> int:
    store = LogStore(uri, connect_timeout_s=3)
    sqlite = store.dialect == "sqlite"
    closing, stop = threading.Event(), threading.Event()

    def watch_stdin() -> None:
        for _ in sys.stdin:
            pass
        closing.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # a Ctrl-C to the group: the writer decides
    waiting: set[str] = set()  # files whose load failed once: later loads are replays
    migrated = False
    down_until = 0.0
    said_down = False
    while not stop.is_set():
        files = sorted(folder.glob("*.npz"))
        if not files:
            if closing.is_set():
                break
            time.sleep(poll_s)
            continue
        if time.monotonic() < down_until:
            if closing.is_set():
                break  # the writer is closing and the database is down: the files wait on disk
            time.sleep(max(0.0, min(poll_s, down_until - time.monotonic())))
            continue
        try:
            if not migrated:
                store.migrate()
                migrated = True
            for path in files:
                if stop.is_set():
                    break
                try:
                    batch = Batch.load(path)
                except (OSError, ValueError, KeyError) as exc:  # unreadable: kept aside, never retried
                    rejected = folder.parent / "rejected"
                    rejected.mkdir(exist_ok=True)
                    path.rename(rejected / f"{folder.name}-{path.name}")
                    _emit(rejected=0, unreadable=f"{path.name}: {first_line(exc)}")
                    continue
                try:
                    store.insert_prediction_rows(batch.rows(sqlite))
                except TRANSIENT:
                    raise
                except sa.exc.SQLAlchemyError as exc:  # the rows themselves: kept aside, counted
                    rejected = folder.parent / "rejected"
                    rejected.mkdir(exist_ok=True)
                    path.rename(rejected / f"{folder.name}-{path.name}")
                    _emit(rejected=len(batch), reason=first_line(exc)[:300])
                    continue
                path.unlink(missing_ok=True)
                # a file that waited (the database down) or came from a dead writer: a replay
                late = path.name in waiting or path.name.startswith("0-")
                # Every row of the file counts, the ones the insert skipped too: they are there from
                # an earlier try whose commit the database took but whose answer was cut (or from a
                # loader killed before it deleted the file); no loader counted them, since a file's
                # rows are counted once, here, after it is gone.
                _emit(**{"replayed" if late else "written": len(batch)})
                waiting.discard(path.name)
            said_down = False
        except Exception as exc:  # noqa: BLE001 - the database down (or any failure): wait, retry
            down_until = time.monotonic() + retry_s
            late = [p for p in sorted(folder.glob("*.npz")) if p.name not in waiting]
            rows = 0
            for p in late:
                try:
                    rows += len(Batch.load(p))
                except (OSError, ValueError, KeyError):
                    pass
                waiting.add(p.name)
            if rows:
                _emit(spooled=rows)
            if not said_down:
                _emit(down=first_line(exc)[:300])
                said_down = True
            if closing.is_set() and not stop.is_set():
                # the writer is gone or closing and the database is down: nothing more to do here;
                # the files stay for the next writer (or `churn monitor`)
                break
    # what is left waits on disk for the next writer: counted as spooled once
    rows = 0
    for p in sorted(folder.glob("*.npz")):
        if p.name not in waiting:
            try:
                rows += len(Batch.load(p))
            except (OSError, ValueError, KeyError):
                pass
    if rows:
        _emit(spooled=rows)
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--retry-s", type=float, default=2.0)
    ap.add_argument("--poll-s", type=float, default=0.2)
    args = ap.parse_args(argv)
    uri = os.environ.get("CHURN_LOADER_URI")
    if not uri:
        print("error: CHURN_LOADER_URI is not set", file=sys.stderr)
        return 2
    return run(Path(args.dir), uri, args.retry_s, args.poll_s)


if __name__ == "__main__":
    sys.exit(main())
