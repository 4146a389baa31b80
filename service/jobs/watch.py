"""Follow a job's event log: what WatchJob streams.

Events come from several writers (the API, the scheduler, workers' reports through the intake), all
through this process's JobStore, which rings the job's bell once a write has committed
(service/jobs/event_bell.py). A watcher reads the database when the bell rings, not on a timer per
stream; `fallback_s` is the safety net for writes it cannot hear (another replica's, on a shared
PostgreSQL). It checks `stop` (the client went away) every `stop_check_s` without touching the
database. A watch resumed from a sequence number sees every later event once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from service.jobs.store import JobStore
from service.records import EventKind, JobEvent, JobState

FALLBACK_S = 2.0
STOP_CHECK_S = 0.2
BATCH = 500


def follow_events(
    store: JobStore,
    job_id: str,
    after_seq: int = 0,
    *,
    stop: threading.Event | None = None,
    fallback_s: float = FALLBACK_S,
    stop_check_s: float = STOP_CHECK_S,
) -> Iterator[tuple[JobEvent, JobState]]:
    """Each event after `after_seq` with the job's state once it was recorded; ends after the final state.

    NotFound for an unknown job is raised before the first event.
    """
    stop = stop or threading.Event()
    if after_seq < 0:
        after_seq = 0
    store.get_job(job_id)
    state = store.state_at(job_id, after_seq)
    seq = after_seq
    while not stop.is_set():
        # the bell's version before reading: a write that commits after this read rings a newer one
        version = store.bell.version(job_id)
        # read the state first: when it is final, every event up to the final one is already committed
        finished = store.get_job(job_id).state.is_final
        while True:
            batch = store.events_after(job_id, seq, limit=BATCH)
            for event in batch:
                if event.kind == EventKind.STATE:
                    state = JobState(event.data["state"])
                seq = event.seq
                yield event, state
            if len(batch) < BATCH:
                break
        if finished:
            return
        read_at = time.monotonic()
        while not stop.is_set():
            waited = time.monotonic() - read_at
            if waited >= fallback_s:
                break
            if store.bell.wait(job_id, version, min(stop_check_s, fallback_s - waited)) != version:
                break
