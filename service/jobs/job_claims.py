"""How the scheduler takes a queued job as its own, and gives it back: with or without leases.

One replica on SQLite (`QueueClaims`): the queue is read, the job moved to RUNNING when its worker
starts, and at start-up every interrupted job is this replica's. Several replicas on one PostgreSQL
(`LeasedClaims`): a job is claimed with a lease (RUNNING at once, leased to this replica) and the lease
kept renewed (service.jobs.scheduler_leases); a claim without a worker goes back to the queue, a job
whose lease another replica took over is reported lost so that the scheduler ends its worker here, and a
dead replica's job whose worker runs on (a TrainJob) is adopted: the scheduler watches that worker here.
The scheduler asks the same questions either way and never looks at which one it has.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from service.errors import FailedPrecondition
from service.jobs.scheduler_leases import LeaseKeeper
from service.jobs.store import JobStore
from service.jobs.store_takeover import Adopted
from service.records import EventKind, Job, JobState
from service.settings import Settings

log = logging.getLogger(__name__)

HAND_OVER_SLACK_S = 2.0  # beyond the others' renewal period: their look, and its write


class Claims(Protocol):
    @property
    def replica(self) -> str | None:
        """Whose interrupted jobs this service re-queues at start-up; None: all of them."""

    def take(self, peeked: Job, running: Sequence[str]) -> Job | None:
        """The job to start now, given the oldest queued one (`peeked`, whose GPUs are free); None when
        there is none. `running`: the jobs that have a worker here."""

    def begin(self, job: Job, message: str) -> Job | None:
        """The job is RUNNING, its worker starting (`message` says where); None when it was cancelled
        meanwhile (then no worker is started)."""

    def give_back(self, job: Job, reason: str) -> None:
        """A taken job got no worker: it goes back to the queue (unless it has moved on)."""

    def lost(self, running: Sequence[str]) -> list[str]:
        """Of `running`, the jobs another replica has taken over: their workers must end here."""

    def adopted(self) -> list[Adopted]:
        """Jobs of a dead replica whose workers run on, leased to this replica now (each told once): the
        scheduler watches their workers from here."""

    def readopt(self) -> list[Adopted]:
        """At start: this replica's own jobs (an earlier process of its name) whose workers ran on while
        it was away, leased to it again: watched, not re-queued."""

    def hand_over(self, job_ids: Sequence[str]) -> list[str]:
        """Stopping: offer the jobs (their workers run on without this replica) to other replicas; the
        ids one adopted (within a third of a lease and a bit: how often the others look). The rest stay
        this replica's, to be drained."""

    def keep(self, running: Sequence[str]) -> list[str]:
        """While draining: keep the running jobs this replica's; of `running`, the jobs another replica
        has taken over meanwhile (its renewals failed for longer than a lease, or an offer could not be
        withdrawn): no longer watched here. Never raises."""


class QueueClaims:
    """One replica: the queue alone; a job is RUNNING once its worker starts, and nobody else takes it."""

    replica: str | None = None

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def take(self, peeked: Job, running: Sequence[str]) -> Job | None:
        return peeked

    def begin(self, job: Job, message: str) -> Job | None:
        try:
            return self.store.transition(job.id, JobState.RUNNING, message, expect=[JobState.QUEUED])
        except FailedPrecondition:  # cancelled between the queue read and now: look again next tick
            return None

    def give_back(self, job: Job, reason: str) -> None:
        pass  # still QUEUED: nothing was taken

    def lost(self, running: Sequence[str]) -> list[str]:
        return []

    def adopted(self) -> list[Adopted]:
        return []  # no other replica: nobody's worker to adopt

    def readopt(self) -> list[Adopted]:
        return []  # a local worker stops with its service: nothing ran on

    def hand_over(self, job_ids: Sequence[str]) -> list[str]:
        return []  # no other replica to take them

    def keep(self, running: Sequence[str]) -> list[str]:
        return []


class LeasedClaims:
    """Several replicas on one database: each job claimed with a lease, renewed from the scheduler's tick."""

    def __init__(
        self,
        store: JobStore,
        replica: str,
        lease_s: float,
        adoptable: Callable[[str], bool],
        drain_grace_s: float,
    ) -> None:
        self._drain_grace_s = drain_grace_s
        self.store = store
        self.replica: str | None = replica
        self._leases = LeaseKeeper(store, replica, lease_s, adoptable)

    def take(self, peeked: Job, running: Sequence[str]) -> Job | None:
        # another replica may have taken the peeked one: the claim is whatever is oldest now
        return self._leases.claim(exclude=running)

    def begin(self, job: Job, message: str) -> Job | None:
        self.store.append_event(job.id, EventKind.INFO, message)  # RUNNING since the claim
        return job

    def give_back(self, job: Job, reason: str) -> None:
        with contextlib.suppress(FailedPrecondition):  # it has moved on (FAILED): leave it
            self.store.transition(
                job.id, JobState.QUEUED, reason, expect=[JobState.RUNNING], refund_attempt=True
            )

    def lost(self, running: Sequence[str]) -> list[str]:
        return self._not_held(running, self._leases.beat())

    def adopted(self) -> list[Adopted]:
        return self._leases.adopted()

    def readopt(self) -> list[Adopted]:
        return self._leases.readopt()

    def hand_over(self, job_ids: Sequence[str]) -> list[str]:
        wait_s = min(self._leases.lease_s / 3 + HAND_OVER_SLACK_S, self._drain_grace_s / 2)
        try:
            return self._leases.hand_over(job_ids, wait_s)
        except Exception:  # the database is away: drain them as before
            log.warning("handing the running jobs over failed; draining them", exc_info=True)
            return []

    def keep(self, running: Sequence[str]) -> list[str]:
        try:
            return self._not_held(running, self._leases.beat(take_over=False))  # stopping: adopt nothing more
        except Exception:  # the database is away: the next call tries again
            log.warning("renewing leases failed", exc_info=True)
            return []

    def _not_held(self, running: Sequence[str], held: set[str] | None) -> list[str]:
        """Of `running`, the jobs missing from the renewal's answer `held` that another replica has now
        (None: no renewal was due)."""
        if held is None:
            return []
        return [job_id for job_id in running if job_id not in held and self._leases.lost(job_id)]


def claims_for(store: JobStore, settings: Settings, adoptable: Callable[[str], bool]) -> Claims:
    """Leases on a shared PostgreSQL, adopting a dead replica's workers that `adoptable` (the launcher)
    can watch from here; the queue alone on SQLite (one replica)."""
    if store.db.dialect != "postgresql":
        return QueueClaims(store)
    replica = settings.resolved_replica_id
    log.info("replica %s: claiming jobs with %.0f s leases", replica, settings.lease_s)
    if settings.lease_s <= settings.report_lost_s:
        log.warning(
            "TUNESERVE_LEASE_S %.0f is not above TUNESERVE_REPORT_LOST_S %.0f: a dead replica's job "
            "may start elsewhere while its worker still runs",
            settings.lease_s,
            settings.report_lost_s,
        )
    return LeasedClaims(store, replica, settings.lease_s, adoptable, settings.drain_grace_s)
