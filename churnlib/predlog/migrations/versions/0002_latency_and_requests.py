"""Rollouts: each answer's model latency, and rows found by request (a shadow's pair).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:  # SQLite: ADD COLUMN as it is, no table copy
        batch.add_column(sa.Column("latency_ms", sa.Float))
    op.create_index("ix_predictions_request", "predictions", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_predictions_request", table_name="predictions")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("latency_ms")
