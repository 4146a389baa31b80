"""What workers report, taken in: the control plane's side of the internal reporting API.

Each launch of a job gets a fresh secret (`issue`), revoked when its worker exits (`revoke`). Every call
names the job and carries the secret: a secret of another job is PERMISSION_DENIED, an unknown or revoked
one UNAUTHENTICATED. A worker may only make the moves a worker makes (RUNNING -> PACKAGING, RUNNING or
PACKAGING -> FAILED); SUCCEEDED, CANCELLED and requeues stay the scheduler's.

The intake also keeps what the scheduler needs about each worker: when it last sent a heartbeat, and the
stop reason ("cancelled", "draining") that its next heartbeat reply carries. Where all that lives is the
grants' business (service.jobs.grants): this process's memory for one replica, the job store when
several replicas share a PostgreSQL and a worker's call may reach any of them (`intake_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from service.errors import InvalidArgument, PermissionDenied
from service.jobs.grants import EventIn, Grants, LocalGrants
from service.jobs.store import JobStore
from service.jobs.store_grants import SharedGrants
from service.records import Job, JobState
from service.settings import Settings
from service.stop_reasons import STOP_REASONS

log = logging.getLogger(__name__)

# the moves a worker makes: to PACKAGING once trained, to FAILED when training or packaging fails
WORKER_MOVES: dict[JobState, tuple[JobState, ...]] = {
    JobState.PACKAGING: (JobState.RUNNING,),
    JobState.FAILED: (JobState.RUNNING, JobState.PACKAGING),
}
MAX_TOUCH_S = 5.0  # shared grants: a worker's heartbeat time is written at most this often per replica

__all__ = ["WORKER_MOVES", "EventIn", "Intake", "intake_for"]


class Intake:
    """Job-scoped tokens and the worker calls they allow, written into the store. Thread-safe.
    `grants`: where the tokens and what is known of each worker live (default: this process's memory)."""

    def __init__(self, store: JobStore, grants: Grants | None = None) -> None:
        self.store = store
        self.grants: Grants = grants if grants is not None else LocalGrants(store)

    # ------------------------------------------------------------------ the scheduler's side

    def issue(self, job_id: str) -> str:
        """A fresh secret for the worker about to be launched for `job_id` (replacing any earlier one)."""
        return self.grants.issue(job_id)

    def revoke(self, job_id: str) -> None:
        """The worker has exited: its secret opens nothing any more."""
        self.grants.revoke(job_id)

    def forget_predecessor(self, keep: Collection[str] = ()) -> int:
        """At start: an earlier process of this replica's name is gone; its workers' secrets open nothing
        any more, but those of the jobs in `keep` (adopted again); how many were dropped."""
        return self.grants.forget_predecessor(keep)

    def request_stop(self, job_id: str, reason: str) -> None:
        """Tell the worker (in its next heartbeat reply) to stop at a safe point, and why."""
        if reason not in STOP_REASONS:
            raise ValueError(f"stop reason {reason!r}; use one of {STOP_REASONS}")
        self.grants.request_stop(job_id, reason)

    def silent_for(self, job_id: str) -> float:
        """Seconds since the worker of `job_id` last called (or was launched); 0 for none."""
        return self.grants.silent_for(job_id)

    def has_called(self, job_id: str) -> bool:
        """The worker of `job_id` has called at least once since its launch."""
        return self.grants.has_called(job_id)

    # ------------------------------------------------------------------ the worker's side

    def assignment(self, token: str, job_id: str) -> Job:
        self.grants.check(token, job_id)
        return self.store.get_job(job_id)

    def append_events(self, token: str, job_id: str, first: int, events: Sequence[EventIn]) -> int:
        """Store the events numbered first, first+1, ... that are not stored yet; the next number."""
        return self.grants.deliver(token, job_id, first, events)

    def merge_result(self, token: str, job_id: str, fields: dict[str, Any]) -> None:
        self.grants.check(token, job_id)
        try:
            self.store.update_result(job_id, **fields)
        except ValueError as exc:  # an unknown JobResult field
            raise InvalidArgument(str(exc)) from exc

    def move(self, token: str, job_id: str, to_state: JobState, reason: str) -> Job:
        self.grants.check(token, job_id)
        sources = WORKER_MOVES.get(to_state)
        if sources is None:
            raise PermissionDenied(
                f"a worker cannot move job {job_id} to {to_state}; it may move its job only to "
                f"{' or '.join(WORKER_MOVES)} (the scheduler decides the rest)"
            )
        return self.store.transition(job_id, to_state, reason, expect=sources)

    def heartbeat(self, token: str, job_id: str) -> str | None:
        """The stop reason for the worker, if the scheduler asked it to stop."""
        return self.grants.heartbeat(token, job_id)


def intake_for(store: JobStore, settings: Settings) -> Intake:
    """Grants in the store on a shared PostgreSQL (the replicas' leases say who launched what), where a
    worker's call may reach any replica; in memory on SQLite (one replica), as the job claims are
    (service.jobs.job_claims.claims_for)."""
    if store.db.dialect != "postgresql":
        return Intake(store)
    # the silence limit is checked against these writes: a quarter of it keeps the error small
    touch_s = min(MAX_TOUCH_S, settings.worker_silence_s / 4)
    grants = SharedGrants(store, settings.resolved_replica_id, touch_s)
    # the grants of an earlier process of this name are forgotten by the scheduler's start, which knows
    # which of its workers it adopts again
    log.info("reporting grants in the job store: any replica takes any worker's report")
    return Intake(store, grants)
