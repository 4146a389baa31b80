"""Follow a job's event log: what WatchJob streams.

Events come from several writers (the API, the scheduler, workers' reports through the intake), so the
log is polled; the wait is cut short when the watcher goes away (`stop` is set). A watch resumed from
a sequence number sees every later event once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from service.jobs.store import JobStore
from service.records import EventKind, JobEvent, JobState

POLL_S = 0.2
BATCH = 500


def follow_events(
    store: JobStore,
    job_id: str,
    after_seq: int = 0,
    *,
    stop: threading.Event | None = None,
    poll_s: float = POLL_S,
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
        stop.wait(poll_s)
