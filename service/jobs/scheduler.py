"""The scheduler: runs queued jobs through a Launcher, at most N at once, oldest first.

It decides what each worker exit means (see service.jobs.launcher for the exit codes): a packaged job is
handed to the deployer and SUCCEEDS; a crash is retried from the last checkpoint up to `max_job_retries`
times, then FAILS with the reason; a cancelled job is stopped (asked to checkpoint, killed after
`cancel_grace_s`) and CANCELLED. drain() stops starting jobs, asks the running ones to checkpoint and
stop, and re-queues them to resume after a restart. How a worker is started, stopped and watched is the
launcher's business (a local process today: service.jobs.local_launcher).

Each worker gets a job-scoped reporting token from the intake and the reporting API's address in its
environment; a worker whose heartbeats stop for `worker_silence_s` is killed and counts as a crash.

Each worker gets its own GPUs (service.devices): distinct indices from the allocator, given back when
the worker exits, however it exits. The oldest queued job waits while its GPUs are busy, and the
younger ones wait behind it.

Several replicas on one PostgreSQL: the scheduler claims each job with a lease and keeps it renewed
(service.jobs.scheduler_leases); at start it re-queues only its own or never-leased jobs, and a dead
replica's jobs come back to the queue when their lease runs out. On SQLite (one replica) no lease is
taken and everything is as it was: the queue is read, the job moved to RUNNING, all interrupted jobs
re-queued at start.

The polling thread is supervised: `healthy()` (called by the service's health probe) restarts it when
it has died and reports unhealthy until the new thread has completed a tick.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.devices import DeviceAllocator, requested_gpus
from service.errors import FailedPrecondition, one_line
from service.jobs.intake import Intake
from service.jobs.launcher import (
    EXIT_OK,
    REPORT_ADDRESS_ENV,
    REPORT_TOKEN_ENV,
    Launcher,
    LaunchError,
    WorkerExit,
    WorkerHandle,
    worker_env,
)
from service.jobs.scheduler_leases import LeaseKeeper
from service.jobs.store import JobStore
from service.records import EventKind, Job, JobState
from service.settings import Settings

log = logging.getLogger(__name__)

Deployer = Callable[[Job], None]  # serves a PACKAGING job's archive; raises when it cannot
POLL_S = 0.25


@dataclass
class _Worker:
    handle: WorkerHandle
    stop_sent_at: float | None = None  # when it was asked to stop
    killed: bool = False
    silent: float | None = None  # seconds without a heartbeat when it was killed for that
    pending: bool = False  # a TrainJob whose workers have not called yet (kubernetes)

    @property
    def job_id(self) -> str:
        return self.handle.job_id


class Scheduler:
    """Starts, watches and stops workers through a Launcher; one polling thread does all of it."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        launcher: Launcher,
        intake: Intake,
        report_address: str,
        *,
        deployer: Deployer | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.intake = intake
        self.report_address = report_address
        self.deployer = deployer
        self._poll_s = poll_s
        self._workers: dict[str, _Worker] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._deploys = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deploy")
        self._capacity = 1
        self._env: dict[str, str] = {}
        self._devices = DeviceAllocator(())
        self._supervise = threading.Lock()
        self._last_tick_ok = False  # the thread's last tick ran through (reset when it is restarted)
        self._leases: LeaseKeeper | None = None  # a shared database: claims with leases

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Stop workers a dead predecessor left behind, re-queue their jobs, and start scheduling."""
        self._capacity = self.settings.resolved_max_concurrent_jobs()
        self._env = worker_env(self.settings)
        self._devices = DeviceAllocator(self.settings.training_gpus)
        replica = None
        if self.store.db.dialect == "postgresql":
            replica = self.settings.resolved_replica_id
            self._leases = LeaseKeeper(self.store, replica, self.settings.lease_s)
            log.info("replica %s: claiming jobs with %.0f s leases", replica, self.settings.lease_s)
            if self.settings.lease_s <= self.settings.report_lost_s:
                log.warning(
                    "TUNESERVE_LEASE_S %.0f is not above TUNESERVE_REPORT_LOST_S %.0f: a dead replica's job "
                    "may start elsewhere while its worker still runs",
                    self.settings.lease_s,
                    self.settings.report_lost_s,
                )
        # only this replica's own (or never-leased) jobs: the others' workers are alive elsewhere
        for job in self.store.interrupted(replica):
            ref = self.store.worker_ref(job.id)
            if ref is not None:
                self.launcher.stop_leftover(job.id, ref, self.settings.cancel_grace_s)
        for job in self.store.requeue_interrupted(replica=replica):
            log.info("re-queued interrupted job %s", job.id)
        self._start_thread()
        log.info(
            "scheduler started: at most %d job(s) at once, training GPUs %s",
            self._capacity,
            list(self._devices.devices),
        )

    def healthy(self) -> bool:
        """The scheduling thread is alive and its last tick ran through. A dead thread is restarted
        here; it counts as unhealthy until the new one has ticked."""
        with self._supervise:
            if self._thread is None or self._stopping.is_set():
                return False
            if not self._thread.is_alive():
                log.error("the scheduler thread died; starting a new one")
                self._start_thread()
                return False
            return self._last_tick_ok

    def _start_thread(self) -> None:
        self._last_tick_ok = False
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the queue and the cancel requests now rather than at the next poll."""
        self._wake.set()

    def running(self) -> list[str]:
        """Ids of the jobs that have a worker right now."""
        return list(self._workers)

    def devices_held(self) -> dict[str, tuple[int, ...]]:
        """Job id -> the GPU indices its worker holds now."""
        return dict(self._devices.held())

    def stop(self, drain: bool = True) -> None:
        """Stop scheduling. drain: let running workers checkpoint (up to drain_grace_s); else kill them.

        Either way their jobs go back to QUEUED and resume from their last checkpoint after a restart.
        """
        with self._supervise:  # no restart of the thread from now on
            self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        grace = self.settings.drain_grace_s if drain else 0.0
        for worker in self._workers.values():
            if drain:
                self._stop(worker, "draining")
            else:
                self._kill(worker)
        deadline = time.monotonic() + grace
        while self._workers:
            if self._leases is not None:  # the drain may outlast a lease: keep the jobs ours meanwhile
                self._beat_quietly()
            for worker in list(self._workers.values()):
                ended = self.launcher.poll(worker.handle)
                if ended is not None:
                    self._on_exit(worker, ended, draining=True)
                elif time.monotonic() > deadline and not worker.killed:
                    log.warning("job %s did not stop within %.0f s; killing it", worker.job_id, grace)
                    self._kill(worker)
            time.sleep(0.05)
        self._deploys.shutdown(wait=True)
        # a launcher may hold processes of no job (a spare worker); the Launcher protocol leaves it optional
        close = getattr(self.launcher, "close", None)
        if callable(close):
            close()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._tick()
                    self._last_tick_ok = True
                except Exception:  # a busy database, a full disk: log, keep scheduling
                    self._last_tick_ok = False
                    log.exception("scheduler tick failed")
                self._wake.wait(self._poll_s)
                self._wake.clear()
        except BaseException:  # the thread dies: say so now (healthy() restarts it)
            self._last_tick_ok = False
            log.critical("the scheduler thread died", exc_info=True)
            raise

    def _beat_quietly(self) -> None:
        try:
            assert self._leases is not None
            self._leases.beat()
        except Exception:  # the database is away: the next call tries again
            log.warning("renewing leases failed", exc_info=True)

    def _tick(self) -> None:
        if self._leases is not None:
            held = self._leases.beat()
            if held is not None:
                for worker in list(self._workers.values()):
                    if worker.job_id not in held and self._leases.lost(worker.job_id):
                        self._forget(worker)
        for worker in list(self._workers.values()):
            ended = self.launcher.poll(worker.handle)
            if ended is not None:
                self._on_exit(worker, ended, draining=False)
            else:
                self._enforce_cancel(worker)
                self._enforce_heartbeats(worker)
        while len(self._workers) < self._capacity and not self._stopping.is_set():
            job = self.store.next_queued(exclude=list(self._workers))
            if job is not None and self._leases is not None:
                job = self._claim(job)
            if job is None or not self._launch(job):
                break

    def _claim(self, peeked: Job) -> Job | None:
        """Claim the oldest queued job, unless the GPUs the peeked one needs are busy (no claim that
        would be given back at once). Another replica may have taken the peeked one: the claim is
        whatever is oldest now."""
        assert self._leases is not None
        on_cluster = self.settings.launcher == "kubernetes"  # a TrainJob holds none of this machine's GPUs
        gpus = 0 if on_cluster else requested_gpus(peeked.spec, self.settings)
        if gpus <= len(self._devices.devices) and len(self._devices.free()) < gpus:
            return None
        return self._leases.claim(exclude=list(self._workers))

    def _forget(self, worker: _Worker) -> None:
        """Another replica has the job now (its lease ran out here): kill the worker, leave the job alone."""
        log.warning(
            "job %s: its lease was lost (re-queued by another replica); killing worker %s",
            worker.job_id,
            worker.handle.ref,
        )
        self.launcher.kill(worker.handle)
        del self._workers[worker.job_id]
        self.intake.revoke(worker.job_id)
        self.launcher.release(worker.handle)
        self._devices.release(worker.job_id)

    def _launch(self, job: Job) -> bool:
        """Start a worker for `job`: QUEUED, or RUNNING already when it was claimed with a lease."""
        claimed = job.state == JobState.RUNNING
        # a TrainJob's GPUs are the cluster's (its pods ask for them): none of this machine's is held
        on_cluster = self.settings.launcher == "kubernetes"
        gpus = 0 if on_cluster else requested_gpus(job.spec, self.settings)
        # admitted when the service had more GPUs (before a restart): it would wait forever
        if gpus > len(self._devices.devices):
            reason = (
                f"resources.gpus {gpus} is more than the {len(self._devices.devices)} GPU(s) this service "
                "trains on now; resubmit the job with fewer"
            )
            try:
                self.store.transition(job.id, JobState.FAILED, reason, expect=[job.state])
            except FailedPrecondition:  # cancelled meanwhile
                return False
            return True  # the next queued job may start
        devices = self._devices.acquire(job.id, gpus)
        if devices is None:
            if claimed:  # another job took the GPUs since the peek: give the claim back
                self._unclaim(job, "waiting for GPUs")
            return False  # busy: the oldest job waits for its GPUs, and the younger ones behind it
        started = False
        try:
            started = self._start_worker(job, devices, claimed=claimed)
        finally:
            if not started:  # whatever stopped it (a cancel, a failed launch, an error): nothing is held
                self._devices.release(job.id)
                self.intake.revoke(job.id)
                if claimed:
                    self._unclaim(job, "no worker was started")
        return started

    def _unclaim(self, job: Job, reason: str) -> None:
        """A claimed job without a worker goes back to the queue (unless it has moved on: FAILED)."""
        with contextlib.suppress(FailedPrecondition):
            self.store.transition(
                job.id, JobState.QUEUED, reason, expect=[JobState.RUNNING], refund_attempt=True
            )

    def _start_worker(self, job: Job, devices: tuple[int, ...], *, claimed: bool) -> bool:
        if self.settings.launcher == "kubernetes":
            where = f"Kubernetes (namespace {self.settings.k8s_namespace})"
        else:
            where = f"GPU {','.join(map(str, devices))}" if devices else "the CPU"
        if claimed:
            self.store.append_event(job.id, EventKind.INFO, f"worker starting on {where}")
        else:
            try:
                job = self.store.transition(
                    job.id, JobState.RUNNING, f"worker starting on {where}", expect=[JobState.QUEUED]
                )
            except FailedPrecondition:  # cancelled between the queue read and now: look again next tick
                return False
        env = {
            **self._env,
            REPORT_ADDRESS_ENV: self.report_address,
            REPORT_TOKEN_ENV: self.intake.issue(job.id),
        }
        try:
            handle = self.launcher.start(job, devices, env)
        except LaunchError as exc:
            # the job is RUNNING already: without a worker it would stay so for ever, out of a cancel's reach
            self.store.transition(job.id, JobState.FAILED, f"could not start a worker: {exc}")
            return False
        self.store.set_worker_ref(job.id, handle.ref)
        self._workers[job.id] = _Worker(handle)
        log.info("job %s: worker %s started on %s (attempt %d)", job.id, handle.ref, where, job.attempts)
        return True

    def _enforce_cancel(self, worker: _Worker) -> None:
        if worker.stop_sent_at is None:
            if self.store.get_job(worker.job_id).cancel_requested:
                log.info("job %s: cancel requested, stopping worker %s", worker.job_id, worker.handle.ref)
                self._stop(worker, "cancelled")
        elif not worker.killed and time.monotonic() - worker.stop_sent_at > self.settings.cancel_grace_s:
            log.warning(
                "job %s: worker did not stop within %.0f s; killing it",
                worker.job_id,
                self.settings.cancel_grace_s,
            )
            self._kill(worker)

    def _enforce_heartbeats(self, worker: _Worker) -> None:
        """A worker that stopped reporting (hung, frozen, cut off) is killed; its exit counts as a crash."""
        silent = self.intake.silent_for(worker.job_id)
        # a TrainJob's pods may wait for GPUs long before its workers run and call
        worker.pending = self.settings.launcher == "kubernetes" and not self.intake.has_called(worker.job_id)
        limit = self.settings.k8s_start_timeout_s if worker.pending else self.settings.worker_silence_s
        if not worker.killed and silent > limit:
            log.warning("job %s: no heartbeat for %.0f s; killing its worker", worker.job_id, silent)
            worker.silent = silent
            self._kill(worker)

    # ------------------------------------------------------------------ what an exit means

    def _on_exit(self, worker: _Worker, ended: WorkerExit, *, draining: bool) -> None:
        del self._workers[worker.job_id]
        self.intake.revoke(worker.job_id)
        self.launcher.release(worker.handle)  # stragglers: data-loader processes, etc.
        self._devices.release(worker.job_id)  # after the stragglers: nothing of the job is left on them
        rc = ended.code
        job = self.store.get_job(worker.job_id)
        log.info("job %s: worker %s exited with %s (job %s)", job.id, worker.handle.ref, rc, job.state)
        try:
            if job.state.is_final:
                return  # the worker recorded FAILED itself
            if job.cancel_requested:
                self.store.transition(job.id, JobState.CANCELLED, "cancelled by request")
            elif rc == EXIT_OK and job.state == JobState.PACKAGING:
                self._deploys.submit(self._finish, job)
            elif draining:
                reason = "the service is stopping; the job resumes from its last checkpoint after a restart"
                self.store.transition(job.id, JobState.QUEUED, reason, refund_attempt=True)
            elif worker.silent is not None and worker.pending:
                self._retry_or_fail(
                    job,
                    f"its TrainJob's workers did not start within {worker.silent:.0f} s "
                    "(TUNESERVE_K8S_START_TIMEOUT_S; are GPUs free, does the image pull?) and it was deleted",
                )
            elif worker.silent is not None:
                self._retry_or_fail(job, f"worker sent no heartbeat for {worker.silent:.0f} s and was killed")
            else:
                self._retry_or_fail(job, ended.description)
        except FailedPrecondition as exc:  # the job moved on meanwhile (e.g. a concurrent cancel)
            log.warning("job %s: %s", job.id, exc.message)

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

    def _stop(self, worker: _Worker, reason: str) -> None:
        if worker.stop_sent_at is not None or worker.killed:
            return
        worker.stop_sent_at = time.monotonic()
        self.intake.request_stop(worker.job_id, reason)  # first: the worker asks its heartbeat why
        self.launcher.stop(worker.handle, reason)

    def _kill(self, worker: _Worker) -> None:
        worker.killed = True
        self.launcher.kill(worker.handle)
