"""Leases on jobs, for several service replicas on one database: claim the oldest queued job, renew the
leases a replica holds (its heartbeat), re-queue the jobs whose lease ran out (a dead replica's).

The job store (service.jobs.store.JobStore) exposes these as its claim_next, renew and requeue_expired.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from service.jobs.store_codec import job_from_row
from service.jobs.store_db import Database
from service.jobs.store_rows import ACTIVE_STATES, fetch_row, insert_event, placeholders, update_row
from service.records import EventKind, Job, JobState


def claim_next(database: Database, replica: str, lease_s: float, exclude: Sequence[str] = ()) -> Job | None:
    """Take the oldest QUEUED job not in `exclude` for `replica`: it becomes RUNNING (an attempt),
    leased to `replica` for `lease_s` seconds. None when there is nothing to take. Replicas claiming
    at once each get a different job (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: one writer)."""
    now = time.time()
    names, values = placeholders("x", list(exclude))
    skip = f" AND id NOT IN ({names})" if exclude else ""
    with database.write() as db:
        row = db.one(
            f"SELECT * FROM jobs WHERE state = :s{skip} ORDER BY num LIMIT 1{db.skip_locked}",
            {"s": JobState.QUEUED.value} | values,
        )
        if row is None:
            return None
        sets = {
            "state": JobState.RUNNING.value,
            "updated_at": now,
            "attempts": row["attempts"] + 1,
            "started_at": row["started_at"] or now,
            "lease_owner": replica,
            "lease_expires": now + lease_s,
        }
        update_row(db, row["id"], sets)
        data = {"state": JobState.RUNNING, "previous": JobState.QUEUED, "reason": f"claimed by {replica}"}
        insert_event(db, row["id"], EventKind.STATE, f"QUEUED -> RUNNING: claimed by {replica}", data, now)
        return job_from_row(fetch_row(db, row["id"]))


def renew(database: Database, replica: str, lease_s: float) -> list[str]:
    """Extend every lease `replica` holds by `lease_s` from now (its heartbeat); the ids of its jobs.
    A job missing from the answer is no longer this replica's (re-queued after its lease ran out)."""
    now = time.time()
    with database.write() as db:
        rows = db.all(
            f"SELECT id FROM jobs WHERE lease_owner = :r ORDER BY num{db.lock_rows}", {"r": replica}
        )
        db.run(
            "UPDATE jobs SET lease_expires = :until WHERE lease_owner = :r",
            {"until": now + lease_s, "r": replica},
        )
    return [r["id"] for r in rows]


def requeue_expired(database: Database, reason: str) -> list[Job]:
    """Jobs whose lease ran out go back to QUEUED with their attempt refunded (CANCELLED if that was
    asked), to resume from their last checkpoint elsewhere."""
    now = time.time()
    names, values = placeholders("s", [s.value for s in ACTIVE_STATES])
    with database.read() as db:
        rows = db.all(
            f"SELECT id, lease_owner FROM jobs WHERE state IN ({names}) AND lease_expires < :now"
            " ORDER BY num",
            values | {"now": now},
        )
    requeued = []
    for row in rows:
        job = _requeue_if_expired(database, row["id"], f"{reason} ({row['lease_owner']})", now)
        if job is not None:
            requeued.append(job)
    return requeued


def _requeue_if_expired(database: Database, job_id: str, reason: str, now: float) -> Job | None:
    with database.write() as db:
        row = fetch_row(db, job_id, lock=True)
        # checked again under the lock: its replica may have renewed, or finished, since the look
        expires = row["lease_expires"]
        if row["state"] not in {s.value for s in ACTIVE_STATES} or expires is None or not expires < now:
            return None
        cancel = bool(row["cancel_requested"])
        to_state = JobState.CANCELLED if cancel else JobState.QUEUED
        sets: dict[str, Any] = {"state": to_state.value, "updated_at": now, "worker_pid": None}
        sets |= {"lease_owner": None, "lease_expires": None}
        if cancel:
            sets["finished_at"] = now
        else:
            sets["attempts"] = max(0, row["attempts"] - 1)
        update_row(db, job_id, sets)
        why = f"cancelled by request ({reason})" if cancel else reason
        data = {"state": to_state, "previous": row["state"], "reason": why}
        insert_event(db, job_id, EventKind.STATE, f"{row['state']} -> {to_state}: {why}", data, now)
        if not cancel:
            note = f"{reason}; the job resumes from its last checkpoint"
            insert_event(db, job_id, EventKind.INFO, note, {}, now)
        return job_from_row(fetch_row(db, job_id))
