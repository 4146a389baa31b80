"""The scheduler's side of leases, for several service replicas on one database (PostgreSQL).

A replica claims each job it runs (`claim_next`: the job becomes RUNNING, leased to the replica), and
every lease_s / 3 renews all its leases in one statement and takes over the jobs whose lease ran out: a
replica that died stops renewing, so one lease later another replica adopts each of its jobs whose worker
runs on without it (a TrainJob, `adoptable`), and re-queues the others to resume from their last
checkpoint. A job missing from the renewal's answer is no longer this replica's (it was taken over while
this replica could not reach the database): its worker is killed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from service.jobs.store import JobStore
from service.jobs.store_takeover import Adopted
from service.records import Job

log = logging.getLogger(__name__)

HAND_OVER_POLL_S = 0.1


class LeaseKeeper:
    """Claims, renews and re-queues on behalf of one replica; called from the scheduler's thread."""

    def __init__(
        self,
        store: JobStore,
        replica: str,
        lease_s: float,
        adoptable: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.replica = replica
        self.lease_s = lease_s
        self._adoptable = adoptable
        self._clock = clock
        self._due = 0.0  # the next renewal: at once
        self._adopted: list[Adopted] = []  # taken over, not yet handed to the scheduler

    def beat(self, *, force: bool = False, take_over: bool = True) -> set[str] | None:
        """When a renewal is due (or `force`): renew this replica's leases, take over expired ones (unless
        not `take_over`: this replica is stopping), and answer the ids this replica still holds; None
        when it was not time yet."""
        now = self._clock()
        if not force and now < self._due:
            return None
        held = set(self.store.renew(self.replica, self.lease_s))
        self._due = now + self.lease_s / 3
        if not take_over:
            return held
        done = self.store.take_over_expired(self.replica, self.lease_s, self._adoptable)
        for job in done.requeued:
            log.warning("job %s: its replica's lease expired; re-queued (%s)", job.id, job.state)
        for adopted in done.adopted:
            log.warning(
                "job %s: its replica's lease expired; adopted its worker %s, which runs on",
                adopted.job.id,
                adopted.ref,
            )
        self._adopted.extend(done.adopted)
        return held

    def readopt(self) -> list[Adopted]:
        """At start: this replica's own jobs whose workers ran on while it restarted, leased to it again."""
        adopted = self.store.adopt_own(self.replica, self.lease_s, self._adoptable)
        for a in adopted:
            log.warning("job %s: its worker %s ran on while this replica restarted; adopted again",
                        a.job.id, a.ref)  # fmt: skip
        return adopted

    def hand_over(self, job_ids: Sequence[str], wait_s: float) -> list[str]:
        """Offer the jobs (workers that run on without this replica) to the other replicas and wait up to
        `wait_s` for them to adopt; the ids adopted. The others are this replica's again."""
        offered = [job_id for job_id in job_ids if self.store.offer_lease(job_id, self.replica)]
        taken: list[str] = []
        deadline = self._clock() + wait_s
        while offered and self._clock() < deadline:
            time.sleep(HAND_OVER_POLL_S)
            for job_id in [j for j in offered if self.store.lease_owner(j) != self.replica]:
                offered.remove(job_id)
                taken.append(job_id)
        why = f"no other replica adopted it within {wait_s:.0f} s: it is drained instead"
        for job_id in offered:
            if not self.store.reclaim_lease(job_id, self.replica, self.lease_s, why):
                taken.append(job_id)  # adopted at the last moment
        return taken

    def adopted(self) -> list[Adopted]:
        """The jobs adopted since the last call (leased to this replica now, their workers running)."""
        taken, self._adopted = self._adopted, []
        return taken

    def claim(self, exclude: Sequence[str]) -> Job | None:
        """The oldest queued job, now RUNNING and leased to this replica; None when the queue is empty."""
        job = self.store.claim_next(self.replica, self.lease_s, exclude)
        if job is not None:
            # a claim lives lease_s from now: renew at the usual pace from here, not from the last beat
            self._due = min(self._due, self._clock() + self.lease_s / 3)
        return job

    def lost(self, job_id: str) -> bool:
        """The job is still active but no longer leased to this replica: another replica has it now."""
        job = self.store.get_job(job_id)
        return not job.state.is_final and self.store.lease_owner(job_id) != self.replica
