"""Leases: the replica that claimed a job and until when, so a dead replica's jobs can be re-queued."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_owner", sa.Text))
    op.add_column("jobs", sa.Column("lease_expires", sa.Float))
    op.create_index("jobs_lease_owner", "jobs", ["lease_owner"])
