"""Report grants: the job-scoped secret each launch of a worker gets, and what is known about its worker.

A grant holds the secret (or its hash), when the worker last called, whether it has called at all (a
TrainJob's pods may wait for GPUs first), the number of the next event it owes, and the stop reason
("cancelled", "draining") its next heartbeat reply carries. Two homes, one contract (`Grants`):
`LocalGrants` here, in this process's memory (one replica: SQLite, the default), and `SharedGrants`
(service.jobs.store_grants) in the job store, where several replicas on one PostgreSQL each take any
worker's report, whichever of them launched it.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.jobs.store import JobStore
from service.records import EventKind

EventIn = tuple[EventKind, str, dict[str, Any]]


class Grants(Protocol):
    """The scheduler's side (issue, revoke, request_stop, silent_for, has_called) and the worker's (check,
    deliver). Thread-safe."""

    def forget_predecessor(self, keep: Collection[str] = ()) -> int:
        """At start: drop the grants an earlier process under this replica's name issued, but those of the
        jobs in `keep` (adopted again: their workers ran on); how many were dropped."""
        ...

    def issue(self, job_id: str) -> str:
        """A fresh secret for the worker about to be launched for `job_id` (replacing any earlier one)."""
        ...

    def revoke(self, job_id: str) -> None:
        """The worker this process launched has exited: its secret opens nothing any more."""
        ...

    def request_stop(self, job_id: str, reason: str) -> None:
        """The worker's next heartbeat reply carries `reason` (the first one asked for stays)."""
        ...

    def silent_for(self, job_id: str) -> float:
        """Seconds since the worker of `job_id` last called (or was launched); 0 for none."""
        ...

    def has_called(self, job_id: str) -> bool:
        """The worker of `job_id` has called at least once since its launch."""
        ...

    def check(self, token: str, job_id: str) -> str | None:
        """Authorize a call of the worker of `job_id` and note it (its heartbeat); its stop reason."""
        ...

    def heartbeat(self, token: str, job_id: str) -> str | None:
        """`check`, for a heartbeat: the stop reason returned is what the worker is told (and acts on)."""
        ...

    def deliver(self, token: str, job_id: str, first: int, events: Sequence[EventIn]) -> int:
        """Authorize, then store the events numbered first, first+1, ... not stored yet; the next number."""
        ...


def new_token() -> str:
    return secrets.token_urlsafe(32)


def unknown_token() -> Unauthenticated:
    return Unauthenticated(
        "the reporting token is unknown or revoked (its worker has exited, or the service restarted); "
        "only a worker launched by this service may report"
    )


def other_job(job_id: str) -> PermissionDenied:
    return PermissionDenied(f"this reporting token belongs to another job, not to {job_id!r}")


def fresh_events(job_id: str, first: int, expected: int, events: Sequence[EventIn]) -> list[EventIn]:
    """Of a batch numbered from `first`, the events not stored yet (`expected` is the next one owed): a
    retried batch adds nothing twice; a gap is refused."""
    if first > expected:
        raise InvalidArgument(
            f"events from number {first} of job {job_id}, but {expected} is the next one expected; "
            "send every event once, in order"
        )
    return list(events)[expected - first :]


@dataclass
class _Grant:
    token: str
    last_seen: float  # time.monotonic() of the last call (the launch, to start with)
    called: bool = False
    next_event: int = 0
    stop_reason: str | None = None
    events_lock: threading.Lock = field(default_factory=threading.Lock)  # one batch at a time


class LocalGrants:
    """Grants in this process's memory: one replica, whose workers report to it alone."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._grants: dict[str, _Grant] = {}
        self._lock = threading.Lock()

    def forget_predecessor(self, keep: Collection[str] = ()) -> int:
        return 0  # a predecessor's grants were in its memory: gone with it

    def issue(self, job_id: str) -> str:
        token = new_token()
        with self._lock:
            self._grants[job_id] = _Grant(token, time.monotonic())
        return token

    def revoke(self, job_id: str) -> None:
        with self._lock:
            self._grants.pop(job_id, None)

    def request_stop(self, job_id: str, reason: str) -> None:
        with self._lock:
            grant = self._grants.get(job_id)
            if grant is not None and grant.stop_reason is None:
                grant.stop_reason = reason

    def silent_for(self, job_id: str) -> float:
        with self._lock:
            grant = self._grants.get(job_id)
            return 0.0 if grant is None else time.monotonic() - grant.last_seen

    def has_called(self, job_id: str) -> bool:
        with self._lock:
            grant = self._grants.get(job_id)
            return grant is not None and grant.called

    def check(self, token: str, job_id: str) -> str | None:
        return self._authorize(token, job_id).stop_reason

    def heartbeat(self, token: str, job_id: str) -> str | None:
        return self.check(token, job_id)  # no other replica adopts this one's workers (one replica)

    def deliver(self, token: str, job_id: str, first: int, events: Sequence[EventIn]) -> int:
        grant = self._authorize(token, job_id)
        with grant.events_lock:  # one batch at a time per launch: numbers and order stay together
            fresh = fresh_events(job_id, first, grant.next_event, events)
            if fresh:
                self.store.append_events(job_id, fresh)
                grant.next_event += len(fresh)
            return grant.next_event

    def _authorize(self, token: str, job_id: str) -> _Grant:
        presented = token.encode()
        with self._lock:
            grants = list(self._grants.items())
        owner: str | None = None
        for granted_job, grant in grants:  # every secret compared, in constant time each
            if hmac.compare_digest(grant.token.encode(), presented):
                owner = granted_job
        if owner is None:
            raise unknown_token()
        if owner != job_id:
            raise other_job(job_id)
        grant = dict(grants)[owner]
        grant.last_seen = time.monotonic()
        grant.called = True
        return grant
