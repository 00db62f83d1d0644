"""Alembic environment of the prediction log: run by ``churnlib.predlog.store.migrate`` on its connection.

The version table is ``churn_log_version`` (not Alembic's default), so the log
may share a database with MLflow's own tables without touching them.
"""

from alembic import context

VERSION_TABLE = "churn_log_version"

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
