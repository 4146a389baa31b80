"""What a worker's exit means for its job (the exit codes: service.jobs.launcher).

A packaged job is handed to the deployer on a thread of its own and SUCCEEDS (FAILS when serving fails);
a crash is retried from the last checkpoint up to `max_job_retries` times, then FAILS with the reason; a
cancelled job is CANCELLED; a drained one goes back to the queue with its attempt refunded. The scheduler
decides when a worker ends; this decides what its job becomes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from service.errors import FailedPrecondition, one_line
from service.jobs.launcher import EXIT_OK, WorkerExit
from service.jobs.store import JobStore
from service.records import EventKind, Job, JobState
from service.settings import Settings

log = logging.getLogger(__name__)

Deployer = Callable[[Job], None]  # serves a PACKAGING job's archive; raises when it cannot


class ExitOutcomes:
    """Moves a job on after its worker's exit; serving runs on one thread so the scheduler never waits."""

    def __init__(self, settings: Settings, store: JobStore, deployer: Deployer | None) -> None:
        self.settings = settings
        self.store = store
        self.deployer = deployer
        self._deploys = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deploy")

    def settle(
        self, job_id: str, ref: str, ended: WorkerExit, *, draining: bool, killed_for: str | None
    ) -> None:
        """`killed_for`: why the scheduler killed the worker (it counts as a crash), None otherwise."""
        rc = ended.code
        job = self.store.get_job(job_id)
        log.info("job %s: worker %s exited with %s (job %s)", job.id, ref, rc, job.state)
        try:
            if job.state.is_final:
                return  # the worker recorded FAILED itself
            if job.cancel_requested:
                self.store.transition(job.id, JobState.CANCELLED, "cancelled by request")
            elif rc == EXIT_OK and job.state == JobState.PACKAGING:
                self._deploys.submit(self._finish, job)
            elif draining:
                # its replica is stopping, or was (a worker adopted after it heard that replica's drain)
                reason = "stopped for its replica's drain; the job resumes from its last checkpoint"
                self.store.transition(job.id, JobState.QUEUED, reason, refund_attempt=True)
            else:
                self._retry_or_fail(job, killed_for if killed_for is not None else ended.description)
        except FailedPrecondition as exc:  # the job moved on meanwhile (e.g. a concurrent cancel)
            log.warning("job %s: %s", job.id, exc.message)

    def close(self) -> None:
        """Wait for the deploys under way."""
        self._deploys.shutdown(wait=True)

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        attempts_allowed = 1 + self.settings.max_job_retries
        if job.attempts < attempts_allowed:
            attempt = f"attempt {job.attempts + 1} of {attempts_allowed}"
            message = f"{reason}; retrying from the last checkpoint ({attempt})"
            self.store.append_event(job.id, EventKind.WARNING, message, {"reason": reason})
            self.store.transition(job.id, JobState.QUEUED, f"retry after: {reason}")
        else:
            plural = "s" if job.attempts != 1 else ""
            self.store.transition(job.id, JobState.FAILED, f"{reason}, {job.attempts} attempt{plural}")

    def _finish(self, job: Job) -> None:
        """Serve a packaged job (when asked and possible), then SUCCEEDED; FAILED when serving fails."""
        try:
            if not job.spec.serving.enabled:
                self.store.transition(job.id, JobState.SUCCEEDED, "done (serving.enabled is false)")
            elif self.deployer is None:
                self.store.append_event(
                    job.id, EventKind.WARNING, "not served: serving is disabled on this service"
                )
                self.store.transition(
                    job.id, JobState.SUCCEEDED, "done (serving is disabled on this service)"
                )
            else:
                try:
                    self.deployer(job)
                except Exception as exc:
                    log.exception("job %s: serving failed", job.id)
                    reason = f"serving failed: {one_line(exc)}; the archive is kept, retry with ServeJob"
                    self.store.append_event(job.id, EventKind.ERROR, reason)
                    self.store.transition(job.id, JobState.FAILED, reason)
                    return
                self.store.transition(job.id, JobState.SUCCEEDED, "served")
        except Exception:
            log.exception("job %s: finishing failed", job.id)
