"""Taking over a job whose lease ran out (its replica died), or that its replica hands over as it stops.

Any replica looks at the expired leases every lease_s / 3 (`take_over_expired`): it adopts each job whose
worker runs on without that replica (a TrainJob: the lease and the worker's report grant move to it in
one transaction, so the worker's reports keep being taken and it trains on, in the same attempt), and
re-queues the others (`requeue_expired`: attempt refunded, CANCELLED if that was asked) to resume from
their last checkpoint. A replica restarted under its name adopts its own such jobs again at start
(`adopt_own`); one stopping offers them (`offer_lease`: its lease ends at once) and takes back what no
one adopted (`reclaim_lease`). A job whose grant is gone is never adopted (its worker could not report).
A job whose cancel was asked meanwhile is adopted too: no one else can stop its worker (a re-queue would
mark it CANCELLED and leave the finished TrainJob behind), so the adopter stops it as any cancel
(the reason in the worker's next heartbeat reply, killed after the cancel grace) and deletes it.
The job store (service.jobs.store.JobStore) has these as methods (`TakeOvers`); each write goes through
the process's one writer (Database.run_write).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.jobs.event_bell import EventBell
from service.jobs.store_codec import job_from_row
from service.jobs.store_db import Conn, Database
from service.jobs.store_rows import ACTIVE_STATES, fetch_row, insert_event, placeholders, update_row
from service.records import EventKind, Job, JobState
from service.stop_reasons import DRAINING


@dataclass(frozen=True)
class Adopted:
    """A job whose replica's lease ran out while its worker (`ref`) ran on: leased to the adopter now."""

    job: Job
    ref: str
    # its worker was told of its last replica's drain (a heartbeat reply) before the adoption: it stops
    # all the same, and its job goes back to the queue as a drained one's does
    drained: bool = False


@dataclass(frozen=True)
class TakeOver:
    """What one look at the expired leases did: the jobs adopted, and the ones re-queued (or cancelled)."""

    adopted: list[Adopted] = field(default_factory=list)
    requeued: list[Job] = field(default_factory=list)


class TakeOvers:
    """The job store's methods for taking over another replica's jobs. JobStore has them."""

    db: Database
    bell: EventBell

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
        re-queued as requeue_expired does. A job whose grant is gone is never adopted; one whose cancel
        was asked is, for the adopter to stop its worker."""
        done = take_over_expired(self.db, replica, lease_s, adoptable, "its replica's lease expired")
        for job in [a.job for a in done.adopted] + done.requeued:
            self.bell.ring(job.id)
        return done

    def offer_lease(self, job_id: str, replica: str) -> bool:
        """`replica` is stopping: its lease on the job (whose worker runs on without it) ends now, so
        that the next replica to look adopts it (take_over_expired). False when it is not `replica`'s,
        has ended, or was asked to cancel (that stops the worker instead)."""

        def offer(db: Conn) -> bool:
            row = fetch_row(db, job_id, lock=True)
            if (
                row["lease_owner"] != replica
                or row["state"] not in {s.value for s in ACTIVE_STATES}
                or row["cancel_requested"]
            ):
                return False
            now = time.time()
            update_row(db, job_id, {"lease_expires": 0.0, "updated_at": now})
            note = f"{replica} is stopping: its worker is offered to the other replicas and trains on"
            insert_event(db, job_id, EventKind.INFO, note, {"offered_by": replica}, now)
            return True

        return self.db.run_write(offer)

    def reclaim_lease(self, job_id: str, replica: str, lease_s: float, why: str) -> bool:
        """The offer is withdrawn: the job is `replica`'s again for `lease_s`; False when another
        replica adopted it meanwhile."""

        def reclaim(db: Conn) -> bool:
            row = fetch_row(db, job_id, lock=True)
            if row["lease_owner"] != replica or row["state"] not in {s.value for s in ACTIVE_STATES}:
                return False
            now = time.time()
            update_row(db, job_id, {"lease_expires": now + lease_s, "updated_at": now})
            insert_event(db, job_id, EventKind.INFO, why, {}, now)
            return True

        return self.db.run_write(reclaim)

    def adopt_own(self, replica: str, lease_s: float, adoptable: Callable[[str], bool]) -> list[Adopted]:
        """At a replica's start: the jobs still leased to its name (an earlier process of it died or was
        restarted) whose workers ran on meanwhile (`adoptable(ref)`: a TrainJob), each leased to it again
        for `lease_s` with its worker's grant, so that it trains on; the others are left to
        requeue_interrupted. A job whose grant is gone is not adopted; one whose cancel was asked is, for
        this replica to stop its worker."""
        adopted = adopt_own(self.db, replica, lease_s, adoptable)
        for a in adopted:
            self.bell.ring(a.job.id)
        return adopted


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
    """Adopt (for `replica`) or re-queue each job whose lease ran out; see TakeOvers.take_over_expired."""
    now = time.time()
    names, values = placeholders("s", [s.value for s in ACTIVE_STATES])
    # never one's own: a replica renews its leases (or offered them, stopping)
    others = "" if replica is None else " AND lease_owner <> :me"
    with database.read() as db:
        rows = db.all(
            "SELECT id, lease_owner, worker_pid FROM jobs"
            f" WHERE state IN ({names}) AND lease_expires < :now{others} ORDER BY num",
            values | {"now": now} | ({} if replica is None else {"me": replica}),
        )
    done = TakeOver()
    for row in rows:
        ref = None if row["worker_pid"] is None else str(row["worker_pid"])
        if replica is not None and ref is not None and adoptable(ref):
            adopted = _adopt(database, row["id"], replica, lease_s, ref, now, restarted=False)
            if adopted is not None:
                done.adopted.append(adopted)
                continue  # else it moved on meanwhile, or cannot be adopted after all: re-queue it
        job = _requeue_if_expired(database, row["id"], f"{reason} ({row['lease_owner']})", now)
        if job is not None:
            done.requeued.append(job)
    return done


def adopt_own(
    database: Database, replica: str, lease_s: float, adoptable: Callable[[str], bool]
) -> list[Adopted]:
    """See TakeOvers.adopt_own."""
    now = time.time()
    names, values = placeholders("s", [s.value for s in ACTIVE_STATES])
    with database.read() as db:
        rows = db.all(
            f"SELECT id, worker_pid FROM jobs WHERE state IN ({names}) AND lease_owner = :r ORDER BY num",
            values | {"r": replica},
        )
    adopted = []
    for row in rows:
        ref = None if row["worker_pid"] is None else str(row["worker_pid"])
        if ref is not None and adoptable(ref):
            one = _adopt(database, row["id"], replica, lease_s, ref, now, restarted=True)
            if one is not None:
                adopted.append(one)
    return adopted


def _adopt(
    database: Database, job_id: str, replica: str, lease_s: float, ref: str, now: float, *, restarted: bool
) -> Adopted | None:
    """Lease the job to `replica` with its worker's grant. `restarted`: it was `replica`'s own (an
    earlier process of that name), else another's whose lease ran out."""

    def adopt(db: Conn) -> Adopted | None:
        row = fetch_row(db, job_id, lock=True)
        # checked again under the lock, as a re-queue does: renewed, finished or relaunched since
        expires, owner = row["lease_expires"], row["lease_owner"]
        # one's own from an earlier process of the name, or another's whose lease ran out
        taken = owner == replica if restarted else (expires is not None and expires < now)
        if (
            not taken
            or row["state"] not in {s.value for s in ACTIVE_STATES}
            or row["worker_pid"] is None
            or str(row["worker_pid"]) != ref
        ):
            return None
        grant = db.one(
            f"SELECT replica, stop_reason, stop_heard FROM report_grants WHERE job_id = :j{db.lock_rows}",
            {"j": job_id},
        )
        if grant is None or grant["replica"] != owner:
            return None  # its worker could not report to anyone: nothing to adopt
        update_row(db, job_id, {"lease_owner": replica, "lease_expires": now + lease_s, "updated_at": now})
        # in the same transaction: no call of the worker finds the lease and its grant on two replicas. A
        # drain its last replica asked for (stopping, it could not hand the job over) is that replica's
        # own: the adopter lets the worker train on, unless a heartbeat reply told it already (it stops
        # then, and the adopter re-queues the job as drained). A cancel stays: it is the job's.
        drained = grant["stop_reason"] == DRAINING and grant["stop_heard"] == DRAINING
        db.run(
            "UPDATE report_grants SET replica = :r, stop_reason = CASE WHEN stop_reason = :draining"
            " AND stop_heard IS NULL THEN NULL ELSE stop_reason END WHERE job_id = :j",
            {"r": replica, "j": job_id, "draining": DRAINING},
        )
        if restarted:
            note = f"{replica} restarted; its worker {ref} ran on and is watched again (adopted: no restart)"
        else:
            note = (
                f"its replica's lease expired ({owner}); its worker {ref} runs on and is watched by "
                f"{replica} from now on (adopted: no restart)"
            )
        if row["cancel_requested"]:
            note += "; it was asked to cancel, and is stopped from here"
        elif drained:
            note += "; it had been told its replica's drain: once it has stopped, the job is re-queued"
        insert_event(db, job_id, EventKind.INFO, note, {"adopted_by": replica, "from": owner}, now)
        return Adopted(job_from_row(fetch_row(db, job_id)), ref, drained)

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
