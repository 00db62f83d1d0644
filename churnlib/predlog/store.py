"""The prediction log's database: one engine per URI, versioned migrations, idempotent inserts.

Any SQLAlchemy URI: the embedded default is SQLite in the workspace
(``sqlite:///<workspace>/prediction_log.db``), the full stack PostgreSQL (a
database of its own, ``churn_log``, created by the compose stack). The schema is
made and changed only by the Alembic migrations in ``migrations/versions`` (the
version is kept in ``churn_log_version``); ``migrate`` runs them under a lock
(PostgreSQL: an advisory lock; SQLite: a file lock), so replicas starting at
once migrate once.

Inserts are idempotent: predictions by ``prediction_id``, outcomes by
(customer, observed_at); a replayed batch or a file loaded twice adds nothing.
A database that cannot be reached is one line (``LogStoreError``) with the
password hidden.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import zlib
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa

from churnlib.errors import LogStoreError, first_line
from churnlib.predlog.schema import metadata, outcomes, prediction_runs, predictions

MIGRATIONS = Path(__file__).parent / "migrations"
# the writer's row tuples, in this order
PREDICTION_COLUMNS = ("prediction_id", "ts", "request_id", "customer_id", "model_name", "model_version", "route",
                      "endpoint", "probability", "label", "contact", "expected_value", "features", "latency_ms")
HEAD = "0002"
# rows per multi-row INSERT: 14 values a row stays under SQLite's 32,766 and PostgreSQL's 65,535
_ROWS_PER_STATEMENT = 1000
_LOCK_KEY = zlib.crc32(b"churn prediction log migrations")  # the advisory lock's number


def safe_uri(uri: str) -> str:
    """The URI with its password hidden, for messages."""
    try:
        return sa.engine.make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: say so as given
        return uri


def _sqlite_path(url: sa.engine.URL) -> Path | None:
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") else None


class LogStore:
    """The prediction log at ``uri``."""

    def __init__(self, uri: str, connect_timeout_s: float = 5.0):
        self.uri = uri
        try:
            url = sa.engine.make_url(uri)
        except sa.exc.ArgumentError:
            raise LogStoreError(f"monitoring.log_uri: not a database URI: {uri!r}") from None
        self.dialect = url.get_backend_name()
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # several replicas write one file: wait for the lock rather than fail at once
            self.engine = sa.create_engine(url, connect_args={"timeout": 30})

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(url, pool_pre_ping=True,
                                           connect_args={"connect_timeout": max(1, int(connect_timeout_s))})
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._path = path
        self._sql_cache: dict[int, str] = {}

    def describe(self) -> str:
        return safe_uri(self.uri)

    def _unreachable(self, exc: BaseException) -> LogStoreError:
        return LogStoreError(f"prediction log unreachable at {self.describe()}: {first_line(exc)}")

    # Schema --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """SQLite: a lock file beside the database, taken before any transaction starts (a
        transaction opened first could read the schema as it was before another process's
        migration committed)."""
        if self._path is None:
            yield
            return
        with open(self._path.with_name(self._path.name + ".migrate.lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def migrate(self) -> str:
        """Bring the schema to the newest version (a no-op when it is there) -> that version."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self._file_lock(), self.engine.begin() as conn:
                if self.dialect == "postgresql":  # held to the end of the migration's transaction
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except sa.exc.OperationalError as exc:
            raise self._unreachable(exc) from None
        return self.version()

    def version(self) -> str | None:
        """The schema version in the database (None: not migrated yet)."""
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table("churn_log_version"):
                    return None
                return conn.execute(sa.text("SELECT version_num FROM churn_log_version")).scalar()
        except sa.exc.OperationalError as exc:
            raise self._unreachable(exc) from None

    # Writing -------------------------------------------------------------------------------

    def _insert(self, table: sa.Table, rows: list[dict[str, Any]], keys: list[str]) -> int:
        """Insert ``rows``, skipping those already there (by ``keys``) -> how many were new.
        Raises SQLAlchemy's errors: the writer decides whether to spool."""
        if not rows:
            return 0
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - only the two stores the project runs on
            raise LogStoreError(f"monitoring.log_uri: {self.dialect} is not supported (sqlite or postgresql)")
        stmt = insert(table).on_conflict_do_nothing(index_elements=keys).returning(table.c[keys[0]])
        with self.engine.begin() as conn:
            return len(conn.execute(stmt, rows).all())

    def insert_predictions(self, rows: list[dict[str, Any]]) -> int:
        """Prediction rows as dicts (tools, tests) -> how many were new."""
        return self._insert(predictions, rows, ["prediction_id"])

    def insert_prediction_rows(self, rows: list[tuple]) -> int:
        """The writer's fast path: tuples in ``PREDICTION_COLUMNS`` order, in multi-row INSERTs of
        up to ``_ROWS_PER_STATEMENT`` rows (one statement, one step into the database, the GIL
        released once, for hundreds of rows; a row at a time made the writer's thread trade the
        GIL with the serving thread per row), in one transaction; ids already present skipped
        -> how many were new."""
        if not rows:
            return 0
        if self.dialect == "sqlite" and isinstance(rows[0][1], dt.datetime):
            # SQLAlchemy's own text form of a DateTime there: naive UTC (the writer gives it so)
            rows = [(r[0], r[1].astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"), *r[2:]) for r in rows]
        new = 0
        with self.engine.begin() as conn:
            for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                chunk = rows[start: start + _ROWS_PER_STATEMENT]
                params = tuple(value for row in chunk for value in row)
                new += max(conn.exec_driver_sql(self._insert_sql(len(chunk)), params).rowcount, 0)
        return new

    def _insert_sql(self, n: int) -> str:
        sql = self._sql_cache.get(n)
        if sql is None:
            mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
            one = f"({', '.join([mark] * len(PREDICTION_COLUMNS))})"
            sql = (f"INSERT INTO predictions ({', '.join(PREDICTION_COLUMNS)}) VALUES {', '.join([one] * n)} "
                   "ON CONFLICT (prediction_id) DO NOTHING")
            self._sql_cache[n] = sql
        return sql

    def insert_outcomes(self, rows: list[dict[str, Any]]) -> int:
        return self._insert(outcomes, rows, ["customer_id", "observed_at"])

    def record_run(self, row: dict[str, Any]) -> None:
        """A `churn predict` run and where its output is (one row; the rows stay in Parquet)."""
        try:
            self._insert(prediction_runs, [row], ["run_id"])
        except sa.exc.OperationalError as exc:
            raise self._unreachable(exc) from None

    # Reading -------------------------------------------------------------------------------

    def count(self, table: str, **where: Any) -> int:
        t = metadata.tables[table]
        stmt = sa.select(sa.func.count()).select_from(t)
        for key, value in where.items():
            stmt = stmt.where(t.c[key] == value)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar())

    def close(self) -> None:
        self.engine.dispose()
