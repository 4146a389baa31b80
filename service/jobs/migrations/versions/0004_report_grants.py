"""Report grants: what any replica needs to take a worker's report, whichever replica launched it.

One row per job with a launched worker: the SHA-256 of its launch token (never the token), the replica
that issued it, when the worker last called (wall clock, time.time(), as the leases), whether it has
called, the number of the next event it owes, and the stop reason its next heartbeat reply carries.
No foreign key to jobs: the tests' TRUNCATE of jobs (and any later clean-up of jobs) must not need to
know this table; a grant of a job that is gone authorizes nothing (service.jobs.store_grants joins jobs).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_grants",
        sa.Column("job_id", sa.Text, primary_key=True),
        # a report is looked up by its token's hash: unique, indexed
        sa.Column("token_sha256", sa.Text, nullable=False, unique=True),
        sa.Column("replica", sa.Text),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("called", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_event", sa.Integer, nullable=False, server_default="0"),
        sa.Column("stop_reason", sa.Text),
    )
