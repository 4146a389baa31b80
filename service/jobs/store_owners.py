"""Per-client limits on a client's jobs, checked inside CreateJob's transaction (so two creations at once
cannot both squeeze under a limit: create_job holds the creation lock)."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import ResourceExhausted
from service.jobs.store_db import Conn
from service.jobs.store_rows import ACTIVE_STATES, placeholders
from service.records import JobState


@dataclass(frozen=True)
class OwnerLimits:
    """A client's caps from the tokens file; None: no cap."""

    owner: str
    max_queued: int | None = None
    max_running: int | None = None


def check_owner_limits(db: Conn, limits: OwnerLimits) -> None:
    """ResourceExhausted naming the client, its count and its limit when one more job would pass a cap."""
    checks = (
        ("queued", (JobState.QUEUED,), limits.max_queued, "max_queued", "wait for one to start or cancel it"),
        ("running", ACTIVE_STATES, limits.max_running, "max_running", "wait for one to end or cancel it"),
    )
    for word, states, cap, field, fix in checks:
        if cap is None:
            continue
        names, values = placeholders("s", [s.value for s in states])
        row = db.one(
            f"SELECT COUNT(*) AS n FROM jobs WHERE owner = :owner AND state IN ({names})",
            values | {"owner": limits.owner},
        )
        count = int(row["n"]) if row is not None else 0
        if count >= cap:
            raise ResourceExhausted(
                f"client {limits.owner} has {count} {word} jobs; its limit is {cap} ({field} in the tokens "
                f"file); {fix}, then retry"
            )
