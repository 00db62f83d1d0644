"""The prediction log: predictions, prediction_runs, outcomes.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "predictions",
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
        sa.Column("features", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_predictions_customer_ts", "predictions", ["customer_id", "ts"])
    op.create_index("ix_predictions_version_ts", "predictions", ["model_name", "model_version", "ts"])
    op.create_table(
        "prediction_runs",
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
    op.create_table(
        "outcomes",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("outcome", sa.SmallInteger, nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.UniqueConstraint("customer_id", "observed_at", name="uq_outcomes_customer_observed"),
    )


def downgrade() -> None:
    op.drop_table("outcomes")
    op.drop_table("prediction_runs")
    op.drop_index("ix_predictions_version_ts", table_name="predictions")
    op.drop_index("ix_predictions_customer_ts", table_name="predictions")
    op.drop_table("predictions")
