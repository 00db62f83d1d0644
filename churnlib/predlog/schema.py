"""The prediction log's tables (SQLAlchemy Core): what was predicted, for whom, by which version; batch runs; outcomes.

The tables are created and changed only by the versioned migrations in
``migrations/versions`` (Alembic); this module describes them for the code
that reads and writes rows, and a test checks that both agree.

- ``predictions``: one row per answered record (Serve). ``prediction_id`` is
  made once, before the first insert, so a batch replayed from the spool after
  an outage is inserted once (``ON CONFLICT DO NOTHING``). ``features`` is the
  record as the model saw it: its model-matrix row, float32 (4 bytes a
  feature; ``decode_features`` and the version's feature spec give back the
  raw values, category strings included). Encoding JSON for every record cost
  the service half its throughput on 256-record requests; the row is already
  there.
- ``prediction_runs``: one row per ``churn predict`` run, pointing at its
  Parquet output (millions of rows are not copied through SQL).
- ``outcomes``: what became of a customer, observed when; unique per
  (customer, observed_at), so loading a file twice changes nothing.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

metadata = sa.MetaData()

# SQLite's INTEGER PRIMARY KEY autoincrements only as INTEGER, not BIGINT
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

predictions = sa.Table(
    "predictions", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(36), nullable=False, unique=True),
    sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
    sa.Column("request_id", sa.String(64)),
    sa.Column("customer_id", sa.String(128)),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("route", sa.String(32), nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("label", sa.SmallInteger, nullable=False),
    sa.Column("contact", sa.Boolean),
    sa.Column("expected_value", sa.Float),
    sa.Column("features", sa.LargeBinary, nullable=False),  # the model-matrix row, float32
    sa.Column("latency_ms", sa.Float),  # the request's model time (0002), for rollouts
    sa.Index("ix_predictions_customer_ts", "customer_id", "ts"),
    sa.Index("ix_predictions_version_ts", "model_name", "model_version", "ts"),
    sa.Index("ix_predictions_request", "request_id"),
)

prediction_runs = sa.Table(
    "prediction_runs", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("input_uri", sa.Text, nullable=False),
    sa.Column("output_uri", sa.Text, nullable=False),
    sa.Column("rows_scored", sa.BigInteger, nullable=False),
    sa.Column("contacts", sa.BigInteger),
    sa.Column("contacts_only", sa.Boolean, nullable=False),
)

outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("outcome", sa.SmallInteger, nullable=False),
    sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.UniqueConstraint("customer_id", "observed_at", name="uq_outcomes_customer_observed"),
)


def encode_features(row: "np.ndarray") -> bytes:
    """A model-matrix row as stored (float32, little-endian)."""
    return np.asarray(row, dtype="<f4").tobytes()


def decode_features(blobs: list[bytes], n_features: int) -> "np.ndarray":
    """Stored rows -> the model matrix (rows that do not have ``n_features`` values are NaN rows)."""
    out = np.full((len(blobs), n_features), np.nan, dtype=np.float32)
    for i, blob in enumerate(blobs):
        if blob is not None and len(blob) == 4 * n_features:
            out[i] = np.frombuffer(blob, dtype="<f4")
    return out
