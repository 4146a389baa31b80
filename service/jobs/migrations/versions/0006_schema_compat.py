"""The oldest code that runs on this schema, for code older than the migrations that made it.

Code reads its own migration scripts, never newer ones: after a rollback to an older release (or an
old replica restarted during a rolling update), the only way for it to know whether it can run on a
schema a newer release migrated is a record in the database. service.jobs.store_migrate writes the
oldest code revision (`OLDEST_CODE` of the migrations so far) into this one-row table after each
upgrade, and reads it when it finds a revision it has no script for.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
OLDEST_CODE = "0004"  # a table older code never reads


def upgrade() -> None:
    op.create_table("schema_compat", sa.Column("oldest_code", sa.Text, nullable=False))
