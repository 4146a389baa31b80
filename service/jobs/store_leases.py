"""Leases on jobs, for several service replicas on one database: claim the oldest queued job, renew the
leases a replica holds (its heartbeat).

A replica claims the oldest queued job with `claim_next` and renews its leases with `renew` while it runs
them; what happens to a job whose lease ran out (a dead replica's) is service.jobs.store_takeover's. The
job store (service.jobs.store.JobStore) has these as methods (`Holders`, with the worker's reference);
each write goes through the process's one writer (Database.run_write).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from service.jobs.event_bell import EventBell
from service.jobs.store_codec import job_from_row
from service.jobs.store_db import Conn, Database
from service.jobs.store_rows import ACTIVE_STATES, fetch_row, insert_event, placeholders, update_row
from service.records import EventKind, Job, JobState


class Holders:
    """The job store's methods about who holds a job: a replica's lease (several replicas on one
    database), a launcher's worker. JobStore has them."""

    db: Database
    bell: EventBell

    def claim_next(self, replica: str, lease_s: float, exclude: Sequence[str] = ()) -> Job | None:
        """Take the oldest QUEUED job not in `exclude` for `replica`: it becomes RUNNING (an attempt),
        leased to `replica` for `lease_s` seconds. None when there is nothing to take. Replicas claiming
        at once each get a different job (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: one writer)."""
        job = claim_next(self.db, replica, lease_s, exclude)
        if job is not None:
            self.bell.ring(job.id)
        return job

    def renew(self, replica: str, lease_s: float) -> list[str]:
        """Extend every lease `replica` holds by `lease_s` from now (its heartbeat); the ids of its jobs.
        A job missing from the answer is no longer this replica's (re-queued after its lease ran out)."""
        return renew(self.db, replica, lease_s)

    def interrupted(self, replica: str | None = None) -> list[Job]:
        """RUNNING/PACKAGING jobs, oldest first; with `replica`, only those leased to it or to no one."""
        names, values = placeholders("s", [s.value for s in ACTIVE_STATES])
        mine = ""
        if replica is not None:
            mine, values = " AND (lease_owner IS NULL OR lease_owner = :r)", values | {"r": replica}
        with self.db.read() as db:
            rows = db.all(f"SELECT * FROM jobs WHERE state IN ({names}){mine} ORDER BY num", values)
        return [job_from_row(r) for r in rows]

    def lease_owner(self, job_id: str) -> str | None:
        """The replica holding the job's lease; None when no one does."""
        with self.db.read() as db:
            row = fetch_row(db, job_id)
        return None if row["lease_owner"] is None else str(row["lease_owner"])

    def set_worker_ref(self, job_id: str, ref: str | None) -> None:
        """What names the job's worker to its launcher (a local launcher's process group id)."""

        def set_ref(db: Conn) -> None:
            fetch_row(db, job_id, lock=True)
            # the column is still called worker_pid: SQLite keeps a pid as an integer and any other
            # launcher's name as text; PostgreSQL keeps text
            update_row(db, job_id, {"worker_pid": ref})

        self.db.run_write(set_ref)

    def worker_ref(self, job_id: str) -> str | None:
        with self.db.read() as db:
            row = fetch_row(db, job_id)
        return None if row["worker_pid"] is None else str(row["worker_pid"])

    def worker_pid(self, job_id: str) -> int | None:
        """The worker's process id when a local launcher started it (tests and benchmarks look it up)."""
        ref = self.worker_ref(job_id)
        return int(ref) if ref is not None and ref.isdigit() else None


def claim_next(database: Database, replica: str, lease_s: float, exclude: Sequence[str] = ()) -> Job | None:
    """Take the oldest QUEUED job not in `exclude` for `replica`: it becomes RUNNING (an attempt),
    leased to `replica` for `lease_s` seconds. None when there is nothing to take. Replicas claiming
    at once each get a different job (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: one writer)."""
    names, values = placeholders("x", list(exclude))
    skip = f" AND id NOT IN ({names})" if exclude else ""

    def claim(db: Conn) -> Job | None:
        now = time.time()
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

    return database.run_write(claim)


def renew(database: Database, replica: str, lease_s: float) -> list[str]:
    """Extend every lease `replica` holds by `lease_s` from now (its heartbeat); the ids of its jobs.
    A job missing from the answer is no longer this replica's (re-queued after its lease ran out)."""

    def extend(db: Conn) -> list[str]:
        rows = db.all(
            f"SELECT id FROM jobs WHERE lease_owner = :r ORDER BY num{db.lock_rows}", {"r": replica}
        )
        db.run(
            "UPDATE jobs SET lease_expires = :until WHERE lease_owner = :r",
            {"until": time.time() + lease_s, "r": replica},
        )
        return [r["id"] for r in rows]

    return database.run_write(extend)
