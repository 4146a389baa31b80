"""What an earlier process of this replica's name left when it died or was stopped: settled once, at the
scheduler's start, before any job is claimed.

Its TrainJobs that trained on meanwhile are adopted again (their workers keep their grants); its other
workers are stopped (a local process group: checkpoint within the cancel grace, then killed) and their
grants forgotten; its jobs without a worker now go back to the queue, resuming from their last checkpoint.
Only this replica's own jobs (or never-leased ones, on SQLite): other replicas' workers are alive elsewhere.
"""

from __future__ import annotations

import logging

from service.jobs.intake import Intake
from service.jobs.job_claims import Claims
from service.jobs.launcher import Launcher
from service.jobs.store import JobStore
from service.jobs.store_takeover import Adopted

log = logging.getLogger(__name__)


def settle_predecessor(
    store: JobStore, launcher: Launcher, intake: Intake, claims: Claims, grace_s: float
) -> list[Adopted]:
    """Settle what the predecessor left (see the module docstring); the jobs adopted again, to watch."""
    replica = claims.replica
    adopted = claims.readopt()  # TrainJobs that trained on while this replica restarted
    kept = [a.job.id for a in adopted]
    forgotten = intake.forget_predecessor(keep=kept)
    if forgotten:
        log.info("%d reporting grant(s) of an earlier %s forgotten", forgotten, replica)
    for job in store.interrupted(replica):
        ref = store.worker_ref(job.id)
        if ref is not None and job.id not in kept:
            launcher.stop_leftover(job.id, ref, grace_s)
    for job in store.requeue_interrupted(replica=replica, exclude=kept):
        log.info("re-queued interrupted job %s", job.id)
    return adopted
