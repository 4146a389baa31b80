"""What workers report, taken in: the control plane's side of the internal reporting API.

Each launch of a job gets a fresh secret (`issue`), revoked when its worker exits (`revoke`). Every call
names the job and carries the secret: a secret of another job is PERMISSION_DENIED, an unknown or revoked
one UNAUTHENTICATED. A worker may only make the moves a worker makes (RUNNING -> PACKAGING, RUNNING or
PACKAGING -> FAILED); SUCCEEDED, CANCELLED and requeues stay the scheduler's.

The intake also keeps what the scheduler needs about each worker: when it last sent a heartbeat, and the
stop reason ("cancelled", "draining") that its next heartbeat reply carries.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.jobs.store import JobStore
from service.records import EventKind, Job, JobState

# the moves a worker makes: to PACKAGING once trained, to FAILED when training or packaging fails
WORKER_MOVES: dict[JobState, tuple[JobState, ...]] = {
    JobState.PACKAGING: (JobState.RUNNING,),
    JobState.FAILED: (JobState.RUNNING, JobState.PACKAGING),
}
STOP_REASONS = ("cancelled", "draining")

EventIn = tuple[EventKind, str, dict[str, Any]]


@dataclass
class _Grant:
    token: str
    last_seen: float  # time.monotonic() of the last call (the launch, to start with)
    called: bool = False  # the worker has made a call (it runs: a TrainJob's pods may wait for GPUs first)
    next_event: int = 0  # the worker's number of the next event it has not delivered yet
    stop_reason: str | None = None
    events_lock: threading.Lock = field(default_factory=threading.Lock)  # one batch at a time


class Intake:
    """Job-scoped tokens and the worker calls they allow, written into the store. Thread-safe."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._grants: dict[str, _Grant] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the scheduler's side

    def issue(self, job_id: str) -> str:
        """A fresh secret for the worker about to be launched for `job_id` (replacing any earlier one)."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._grants[job_id] = _Grant(token, time.monotonic())
        return token

    def revoke(self, job_id: str) -> None:
        """The worker has exited: its secret opens nothing any more."""
        with self._lock:
            self._grants.pop(job_id, None)

    def request_stop(self, job_id: str, reason: str) -> None:
        """Tell the worker (in its next heartbeat reply) to stop at a safe point, and why."""
        if reason not in STOP_REASONS:
            raise ValueError(f"stop reason {reason!r}; use one of {STOP_REASONS}")
        with self._lock:
            grant = self._grants.get(job_id)
            if grant is not None and grant.stop_reason is None:
                grant.stop_reason = reason

    def silent_for(self, job_id: str) -> float:
        """Seconds since the worker of `job_id` last called (or was launched); 0 for none."""
        with self._lock:
            grant = self._grants.get(job_id)
            return 0.0 if grant is None else time.monotonic() - grant.last_seen

    def has_called(self, job_id: str) -> bool:
        """The worker of `job_id` has called at least once since its launch."""
        with self._lock:
            grant = self._grants.get(job_id)
            return grant is not None and grant.called

    # ------------------------------------------------------------------ the worker's side

    def assignment(self, token: str, job_id: str) -> Job:
        self._authorize(token, job_id)
        return self.store.get_job(job_id)

    def append_events(self, token: str, job_id: str, first: int, events: Sequence[EventIn]) -> int:
        """Store the events numbered first, first+1, ... that are not stored yet; the next number."""
        grant = self._authorize(token, job_id)
        with grant.events_lock:  # one batch at a time per launch: numbers and order stay together
            if first > grant.next_event:
                raise InvalidArgument(
                    f"events from number {first} of job {job_id}, but {grant.next_event} is the next one "
                    "expected; send every event once, in order"
                )
            fresh = list(events)[grant.next_event - first :]  # a retried batch adds nothing twice
            if fresh:
                self.store.append_events(job_id, fresh)
                grant.next_event += len(fresh)
            return grant.next_event

    def merge_result(self, token: str, job_id: str, fields: dict[str, Any]) -> None:
        self._authorize(token, job_id)
        try:
            self.store.update_result(job_id, **fields)
        except ValueError as exc:  # an unknown JobResult field
            raise InvalidArgument(str(exc)) from exc

    def move(self, token: str, job_id: str, to_state: JobState, reason: str) -> Job:
        self._authorize(token, job_id)
        sources = WORKER_MOVES.get(to_state)
        if sources is None:
            raise PermissionDenied(
                f"a worker cannot move job {job_id} to {to_state}; it may move its job only to "
                f"{' or '.join(WORKER_MOVES)} (the scheduler decides the rest)"
            )
        return self.store.transition(job_id, to_state, reason, expect=sources)

    def heartbeat(self, token: str, job_id: str) -> str | None:
        """The stop reason for the worker, if the scheduler asked it to stop."""
        return self._authorize(token, job_id).stop_reason

    def _authorize(self, token: str, job_id: str) -> _Grant:
        presented = token.encode()
        with self._lock:
            grants = list(self._grants.items())
        owner: str | None = None
        for granted_job, grant in grants:  # every secret compared, in constant time each
            if hmac.compare_digest(grant.token.encode(), presented):
                owner = granted_job
        if owner is None:
            raise Unauthenticated(
                "the reporting token is unknown or revoked (its worker has exited, or the service "
                "restarted); only a worker launched by this service may report"
            )
        if owner != job_id:
            raise PermissionDenied(f"this reporting token belongs to another job, not to {job_id!r}")
        grant = dict(grants)[owner]
        grant.last_seen = time.monotonic()
        grant.called = True
        return grant
