"""The schema tuneserve's store had before migrations: jobs, their events, the health probe's row.

A SQLite file made by that code is stamped at this revision rather than run through it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite's rowid alias must be spelled INTEGER; PostgreSQL's 4-byte integer would cap job numbers at 2**31
JOB_NUMBER = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# SQLite files from before keep an INTEGER column (a pid stays a number, another launcher's ref text);
# PostgreSQL holds any worker ref as text
WORKER_REF = sa.Text().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        # creation order: newest first, FIFO scheduling, page tokens
        sa.Column("num", JOB_NUMBER, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("idempotency_key", sa.Text, unique=True),
        sa.Column("cancel_requested", sa.Integer, nullable=False, server_default="0"),
        sa.Column("result", sa.Text, nullable=False, server_default="{}"),
        sa.Column("worker_pid", WORKER_REF),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_state", "jobs", ["state", "num"])
    op.create_table(
        "events",
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False, server_default="{}"),
        sa.PrimaryKeyConstraint("job_id", "seq"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "write_probe",  # one row, rewritten by check_writable (health)
        sa.Column("id", sa.Integer, sa.CheckConstraint("id = 1"), primary_key=True, autoincrement=False),
        sa.Column("at", sa.Float, nullable=False),
    )
