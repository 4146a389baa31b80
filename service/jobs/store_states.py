"""The job's state machine, as the job store runs it inside a write: which moves are allowed, a move with
the STATE event that records it, and a cancellation request. Each function runs in one transaction the
caller opened (service.jobs.store), so the state and its event land together or not at all."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from service.errors import FailedPrecondition
from service.jobs.store_codec import job_from_row
from service.jobs.store_db import Conn
from service.jobs.store_rows import ACTIVE_STATES, fetch_row, insert_event, update_row
from service.records import EventKind, Job, JobState

ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.PACKAGING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.PACKAGING: frozenset({JobState.SUCCEEDED, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def transition(
    db: Conn,
    job_id: str,
    to_state: JobState,
    reason: str,
    expect: Iterable[JobState] | None,
    refund_attempt: bool,
) -> Job:
    """Move a job to `to_state` and record a STATE event (see JobStore.transition)."""
    now = time.time()
    row = fetch_row(db, job_id, lock=True)
    current = JobState(row["state"])
    came_from_expected = expect is None or current in frozenset(expect)
    if to_state not in ALLOWED_TRANSITIONS[current] or not came_from_expected:
        raise FailedPrecondition(_transition_refusal(job_id, current, to_state))
    sets: dict[str, Any] = {"state": to_state.value, "updated_at": now}
    if to_state == JobState.RUNNING:
        sets["attempts"] = row["attempts"] + 1
        sets["started_at"] = row["started_at"] or now
    if to_state == JobState.QUEUED:
        sets["worker_pid"] = None
        if refund_attempt:
            sets["attempts"] = max(0, row["attempts"] - 1)
    if to_state.is_final:
        sets["finished_at"] = now
        sets["worker_pid"] = None
    if to_state == JobState.FAILED:
        sets["error"] = reason or "failed"
    if to_state not in ACTIVE_STATES:
        sets |= {"lease_owner": None, "lease_expires": None}
    update_row(db, job_id, sets)
    data = {"state": to_state, "previous": current, "reason": reason}
    message = f"{current} -> {to_state}" + (f": {reason}" if reason else "")
    insert_event(db, job_id, EventKind.STATE, message, data, now)
    return job_from_row(fetch_row(db, job_id))


def request_cancel(db: Conn, job_id: str) -> Job:
    """Mark a job for cancellation; a QUEUED job is CANCELLED at once (see JobStore.request_cancel)."""
    now = time.time()
    row = fetch_row(db, job_id, lock=True)
    state = JobState(row["state"])
    if state.is_final:
        raise FailedPrecondition(
            f"job {job_id} is already {state} and cannot be cancelled; only QUEUED, RUNNING or "
            "PACKAGING jobs can be"
        )
    update_row(db, job_id, {"cancel_requested": 1, "updated_at": now})
    if state == JobState.QUEUED:
        update_row(db, job_id, {"state": JobState.CANCELLED.value, "finished_at": now})
        data = {"state": JobState.CANCELLED, "previous": state, "reason": "cancelled by request"}
        insert_event(db, job_id, EventKind.STATE, "QUEUED -> CANCELLED: cancelled by request", data, now)
    elif not row["cancel_requested"]:
        insert_event(db, job_id, EventKind.INFO, "cancel requested; stopping the worker", {}, now)
    return job_from_row(fetch_row(db, job_id))


def _transition_refusal(job_id: str, current: JobState, to_state: JobState) -> str:
    if current.is_final:
        return f"job {job_id} is already {current} (a final state) and cannot become {to_state}"
    allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[current])) or "none"
    return f"job {job_id} is {current} and cannot become {to_state}; from {current} it can become {allowed}"
