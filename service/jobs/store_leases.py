"""Leases on jobs, for several service replicas on one database: claim the oldest queued job, renew the
leases a replica holds (its heartbeat), take over the jobs whose lease ran out (a dead replica's).

A replica claims the oldest queued job with `claim_next`, renews its leases with `renew` while it runs
them, and any replica takes over the jobs of a replica whose leases ran out with `take_over_expired`:
it adopts a job whose worker runs on without that replica (a TrainJob: the lease and the worker's report
grant move to it in one transaction, and training goes on), and re-queues the others (`requeue_expired`)
to resume from their last checkpoint. The job store (service.jobs.store.JobStore) has these as methods
(`Holders`, with the worker's reference); each write goes through the process's one writer
(Database.run_write).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.jobs.event_bell import EventBell
from service.jobs.store_codec import job_from_row
from service.jobs.store_db import Conn, Database
from service.jobs.store_rows import ACTIVE_STATES, fetch_row, insert_event, placeholders, update_row
from service.records import EventKind, Job, JobState


@dataclass(frozen=True)
class Adopted:
    """A job whose replica's lease ran out while its worker (`ref`) ran on: leased to the adopter now."""

    job: Job
    ref: str


@dataclass(frozen=True)
class TakeOver:
    """What one look at the expired leases did: the jobs adopted, and the ones re-queued (or cancelled)."""

    adopted: list[Adopted] = field(default_factory=list)
    requeued: list[Job] = field(default_factory=list)


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

    def requeue_expired(self, reason: str = "its replica's lease expired") -> list[Job]:
        """Jobs whose lease ran out go back to QUEUED with their attempt refunded (CANCELLED if that was
        asked), to resume from their last checkpoint elsewhere."""
        jobs = requeue_expired(self.db, reason)
        for job in jobs:
            self.bell.ring(job.id)
        return jobs

    def take_over_expired(self, replica: str, lease_s: float, adoptable: Callable[[str], bool]) -> TakeOver:
        """The jobs whose lease ran out: each one whose worker `adoptable(ref)` says `replica` can watch
        from where it is (a TrainJob) is adopted, leased to `replica` for `lease_s` with its worker's grant
        (so its worker's reports go on being taken, and its attempt stays the same); the others are
        re-queued as requeue_expired does. A job whose cancel was asked, or whose grant is gone, is never
        adopted."""
        done = take_over_expired(self.db, replica, lease_s, adoptable, "its replica's lease expired")
        for job in [a.job for a in done.adopted] + done.requeued:
            self.bell.ring(job.id)
        return done

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


def requeue_expired(database: Database, reason: str) -> list[Job]:
    """Jobs whose lease ran out go back to QUEUED with their attempt refunded (CANCELLED if that was
    asked), to resume from their last checkpoint elsewhere."""
    return take_over_expired(database, None, 0.0, lambda ref: False, reason).requeued


def take_over_expired(
    database: Database,
    replica: str | None,
    lease_s: float,
    adoptable: Callable[[str], bool],
    reason: str,
) -> TakeOver:
    """Adopt (for `replica`) or re-queue each job whose lease ran out; see Holders.take_over_expired."""
    now = time.time()
    names, values = placeholders("s", [s.value for s in ACTIVE_STATES])
    with database.read() as db:
        rows = db.all(
            "SELECT id, lease_owner, worker_pid, cancel_requested FROM jobs"
            f" WHERE state IN ({names}) AND lease_expires < :now ORDER BY num",
            values | {"now": now},
        )
    done = TakeOver()
    for row in rows:
        ref = None if row["worker_pid"] is None else str(row["worker_pid"])
        if replica is not None and ref is not None and not row["cancel_requested"] and adoptable(ref):
            job = _adopt_if_expired(database, row["id"], replica, lease_s, ref, now)
            if job is not None:
                done.adopted.append(Adopted(job, ref))
                continue  # else it moved on meanwhile, or cannot be adopted after all: re-queue it
        job = _requeue_if_expired(database, row["id"], f"{reason} ({row['lease_owner']})", now)
        if job is not None:
            done.requeued.append(job)
    return done


def _adopt_if_expired(
    database: Database, job_id: str, replica: str, lease_s: float, ref: str, now: float
) -> Job | None:
    def adopt(db: Conn) -> Job | None:
        row = fetch_row(db, job_id, lock=True)
        # checked again under the lock, as a re-queue does: renewed, finished, cancelled or relaunched since
        expires, owner = row["lease_expires"], row["lease_owner"]
        if (
            row["state"] not in {s.value for s in ACTIVE_STATES}
            or expires is None
            or not expires < now
            or row["cancel_requested"]
            or row["worker_pid"] is None
            or str(row["worker_pid"]) != ref
        ):
            return None
        grant = db.one(f"SELECT replica FROM report_grants WHERE job_id = :j{db.lock_rows}", {"j": job_id})
        if grant is None or grant["replica"] != owner:
            return None  # its worker could not report to anyone: nothing to adopt
        update_row(db, job_id, {"lease_owner": replica, "lease_expires": now + lease_s, "updated_at": now})
        # in the same transaction: no call of the worker finds the lease and its grant on two replicas
        db.run("UPDATE report_grants SET replica = :r WHERE job_id = :j", {"r": replica, "j": job_id})
        note = (
            f"its replica's lease expired ({owner}); its worker {ref} runs on and is watched by {replica} "
            "from now on (adopted: no restart)"
        )
        insert_event(db, job_id, EventKind.INFO, note, {"adopted_by": replica, "from": owner}, now)
        return job_from_row(fetch_row(db, job_id))

    return database.run_write(adopt)


def _requeue_if_expired(database: Database, job_id: str, reason: str, now: float) -> Job | None:
    def requeue(db: Conn) -> Job | None:
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

    return database.run_write(requeue)
