"""The job store's row-level SQL, shared by its operations: fetch (and lock) a job, update it, number an
event. Plain SQL with `:name` parameters that SQLite and PostgreSQL both run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from service.errors import NotFound
from service.jobs.store_codec import jsonable
from service.jobs.store_db import Conn, Row
from service.records import EventKind, JobEvent, JobState

ACTIVE_STATES = (JobState.RUNNING, JobState.PACKAGING)  # a worker (and, when claimed, a lease) holds the job


def fetch_row(db: Conn, job_id: str, *, lock: bool = False) -> Row:
    """The job's row; `lock` holds it until the transaction ends (PostgreSQL: other writers wait, which
    is what keeps a job's event numbers gapless and unique across replicas)."""
    row = db.one(f"SELECT * FROM jobs WHERE id = :id{db.lock_rows if lock else ''}", {"id": job_id})
    if row is None:
        raise job_not_found(job_id)
    return row


def job_not_found(job_id: str) -> NotFound:
    """The one answer for a job that does not exist, and (service.jobs.manager) for another client's job:
    the same words, so the answer tells nothing about someone else's jobs."""
    return NotFound(f"job {job_id!r} does not exist; ListJobs shows the jobs there are")


def update_row(db: Conn, job_id: str, sets: dict[str, Any]) -> None:
    columns = ", ".join(f"{name} = :{name}" for name in sets)
    db.run(f"UPDATE jobs SET {columns} WHERE id = :job_id_", {**sets, "job_id_": job_id})


def insert_event(
    db: Conn, job_id: str, kind: EventKind, message: str, data: dict[str, Any], now: float
) -> JobEvent:
    """Add the job's next event; the caller holds the job's row lock (or the only write transaction)."""
    row = db.one("SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM events WHERE job_id = :id", {"id": job_id})
    seq = int(row["next"]) if row is not None else 1
    payload = jsonable(data)
    db.run(
        "INSERT INTO events (job_id, seq, time, kind, message, data)"
        " VALUES (:id, :seq, :time, :kind, :message, :data)",
        {"id": job_id, "seq": seq, "time": now, "kind": kind.value, "message": message}
        | {"data": json.dumps(payload)},
    )
    return JobEvent(job_id, seq, now, kind, message, payload)


def placeholders(prefix: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`:p0, :p1, ...` and their values: an IN list both sqlite3 and SQLAlchemy's text() take."""
    params = {f"{prefix}{i}": value for i, value in enumerate(values)}
    return ", ".join(f":{name}" for name in params), params
