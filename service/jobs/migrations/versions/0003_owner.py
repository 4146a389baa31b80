"""Owners: the client that created a job (NULL: created without authentication, or before owners)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.Text))
    # ListJobs for one client, newest first; a client's queued/running counts at CreateJob
    op.create_index("jobs_owner", "jobs", ["owner", "state", "num"])
