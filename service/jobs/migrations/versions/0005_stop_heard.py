"""Report grants remember the stop reason a heartbeat reply told the worker (`stop_heard`).

An adoption clears the drain a stopping replica asked of its TrainJob, so that the worker trains on
under the adopter (service.jobs.store_takeover). A worker already told of it stops all the same; with
this column the adopter knows that, and re-queues the job at its exit as a drain (attempt refunded),
not as a crash.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
# Code from 0004 on runs on it: it names the columns it reads and writes. An older replica beside a newer
# one neither records a drain it tells (an adopter then counts that worker's exit as a crash: an attempt
# spent) nor clears the record when it issues a grant again (a stale one may make an adopter stop a worker
# that had not heard the drain). Either way the job resumes from its last checkpoint.
OLDEST_CODE = "0004"


def upgrade() -> None:
    op.add_column("report_grants", sa.Column("stop_heard", sa.Text))
