"""The scheduler: runs queued jobs through a Launcher, at most N at once, oldest first.

It decides when a worker starts and stops: a cancelled job's worker is asked to checkpoint and killed
after `cancel_grace_s`; drain() stops starting jobs, asks the running ones to checkpoint and stop, and
re-queues them to resume after a restart. What an exit means for the job (served, retried, failed) is
decided in service.jobs.exit_outcomes. How a worker is started, stopped and watched is the launcher's
business (a local process, torchrun or a Kubernetes TrainJob), and so are how many of this machine's GPUs
it holds and how long its first heartbeat may take.

Each worker gets a job-scoped reporting token from the intake and the reporting API's address in its
environment; a worker whose heartbeats stop for `worker_silence_s` is killed and counts as a crash.

Each worker gets its own GPUs (service.devices): distinct indices from the allocator, given back when
the worker exits, however it exits. The oldest queued job waits while its GPUs are busy, and the
younger ones wait behind it. So does a job whose warm worker is still on its way (Launcher.worth_waiting).

Several replicas on one PostgreSQL claim jobs with leases, one replica on SQLite reads the queue alone:
service.jobs.job_claims, which the scheduler asks the same questions either way. A dead replica's job
whose worker runs on (a TrainJob) is adopted: this scheduler watches it as if it had launched it.

The polling thread is supervised: `healthy()` (called by the service's health probe) restarts it when
it has died and reports unhealthy until the new thread has completed a tick.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from service.devices import DeviceAllocator
from service.errors import FailedPrecondition, Unavailable
from service.jobs.exit_outcomes import Deployer, ExitOutcomes
from service.jobs.intake import Intake
from service.jobs.job_claims import Claims, QueueClaims, claims_for
from service.jobs.launcher import (
    REPORT_ADDRESS_ENV,
    REPORT_TOKEN_ENV,
    Launcher,
    LaunchError,
    WorkerExit,
    WorkerHandle,
    worker_env,
)
from service.jobs.predecessor import settle_predecessor
from service.jobs.store import JobStore
from service.jobs.store_away_stop import stop_without_store
from service.jobs.store_takeover import Adopted
from service.jobs.supervised_loop import SupervisedLoop
from service.records import Job, JobState
from service.settings import Settings
from service.stop_reasons import CANCELLED, DRAINING

log = logging.getLogger(__name__)

POLL_S = 0.25
# while a queued job waits for a warm worker: its readiness rings no wake(), so look again this often
HELD_POLL_S = 0.05


@dataclass
class _Worker:
    handle: WorkerHandle
    stop_sent_at: float | None = None  # when it was asked to stop
    stopped_for: str | None = None  # ... and why ("cancelled", "draining")
    killed: bool = False
    killed_for: str | None = None  # why the scheduler killed it (no heartbeats): its exit is a crash

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
        self._workers: dict[str, _Worker] = {}
        self._loop = SupervisedLoop("scheduler", self._tick, poll_s)
        self._outcomes = ExitOutcomes(settings, store, deployer)
        self._capacity = 1
        self._env: dict[str, str] = {}
        self._devices = DeviceAllocator(())
        self._claims: Claims = QueueClaims(store)  # with leases on a shared database (start())

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Settle what a dead predecessor of this replica's name left (service.jobs.predecessor: its
        TrainJobs adopted again, its other workers stopped and their jobs re-queued), and start
        scheduling."""
        self._capacity = self.settings.resolved_max_concurrent_jobs()
        self._env = worker_env(self.settings)
        self._devices = DeviceAllocator(self.settings.training_gpus)
        self._claims = claims_for(self.store, self.settings, self.launcher.can_adopt)
        grace_s = self.settings.cancel_grace_s
        for adopted in settle_predecessor(self.store, self.launcher, self.intake, self._claims, grace_s):
            self._adopt(adopted)
        self._loop.start()
        log.info(
            "scheduler started: at most %d job(s) at once, training GPUs %s",
            self._capacity,
            list(self._devices.devices),
        )

    def healthy(self) -> bool:
        """The scheduling thread is alive and its last tick ran through. A dead thread is restarted
        here; it counts as unhealthy until the new one has ticked."""
        return self._loop.healthy()

    def wake(self) -> None:
        """Look at the queue and the cancel requests now rather than at the next poll."""
        self._loop.wake()

    def running(self) -> list[str]:
        """Ids of the jobs that have a worker right now."""
        return list(self._workers)

    def devices_held(self) -> dict[str, tuple[int, ...]]:
        """Job id -> the GPU indices its worker holds now."""
        return dict(self._devices.held())

    def stop(self, drain: bool = True) -> None:
        """Stop scheduling. drain: hand the workers that run on without this replica (TrainJobs) over to
        another replica, and let the others checkpoint (all within drain_grace_s); else kill them all.

        Either way the jobs not handed over go back to QUEUED and resume from their last checkpoint. When
        the job store cannot be reached, nothing is recorded: see service.jobs.store_away_stop.
        """
        self._loop.stop()
        deadline = time.monotonic() + (self.settings.drain_grace_s if drain else 0.0)
        try:
            self._end_workers(drain, deadline)
        except Unavailable as exc:
            log.warning("stopping without the job store (%s); the jobs stay leased to this replica, for "
                        "whoever takes them over", exc.message)  # fmt: skip
            handles = [w.handle for w in self._workers.values()]
            self._workers.clear()
            stop_without_store(self.launcher, handles, drain=drain, deadline=deadline)
        self._outcomes.close()
        # a launcher may hold processes of no job (a spare worker); the Launcher protocol leaves it optional
        close = getattr(self.launcher, "close", None)
        if callable(close):
            close()

    def _end_workers(self, drain: bool, deadline: float) -> None:
        if drain:  # a worker that runs on without this replica (a TrainJob) trains on under another's
            adoptable = [w.job_id for w in self._workers.values() if self.launcher.can_adopt(w.handle.ref)]
            for job_id in self._claims.hand_over(adoptable) if adoptable else []:
                log.info("job %s: handed over to another replica; its worker trains on", job_id)
                self._drop(self._workers[job_id], release=False)
        for worker in self._workers.values():
            if drain:
                self._stop(worker, DRAINING)
            else:
                self._kill(worker)
        while self._workers:
            # the drain may outlast a lease: keep the jobs ours meanwhile. One taken over after all (its
            # renewals failed for a lease, or its offer could not be withdrawn: the database failed
            # mid-way) is the new holder's now
            for job_id in self._claims.keep(list(self._workers)):
                self._forget(self._workers[job_id])
            for worker in list(self._workers.values()):
                ended = self.launcher.poll(worker.handle)
                if ended is not None:
                    self._on_exit(worker, ended, draining=True)
                elif time.monotonic() > deadline and not worker.killed:
                    log.warning("job %s did not stop by the drain's deadline; killing it", worker.job_id)
                    self._kill(worker)
            time.sleep(0.05)

    # ------------------------------------------------------------------ the loop

    def _tick(self) -> None:
        for job_id in self._claims.lost(list(self._workers)):
            self._forget(self._workers[job_id])
        for adopted in self._claims.adopted():
            self._adopt(adopted)
        for worker in list(self._workers.values()):
            ended = self.launcher.poll(worker.handle)
            if ended is not None:
                self._on_exit(worker, ended, draining=worker.stopped_for == DRAINING)
            else:
                self._enforce_stop(worker)
                self._enforce_heartbeats(worker)
        while len(self._workers) < self._capacity and not self._loop.stopping:
            running = list(self._workers)
            peeked = self.store.next_queued(exclude=running)
            # the oldest job waits for its GPUs, and the younger ones behind it (no claim given back at once)
            if peeked is None or not self._gpus_free(peeked):
                break
            if self.launcher.worth_waiting(peeked, self._env):
                # a warm worker is on its way: unclaimed, a cancel meanwhile is a state change, not a launch
                self._loop.soon(HELD_POLL_S)
                break
            job = self._claims.take(peeked, running)
            if job is None or not self._launch(job):
                break

    def _gpus_free(self, job: Job) -> bool:
        """The GPUs `job` needs here are free now (or it needs more than exist: _launch fails it)."""
        gpus = self.launcher.gpus_here(job)
        return gpus > len(self._devices.devices) or len(self._devices.free()) >= gpus

    def _forget(self, worker: _Worker) -> None:
        """Another replica has the job now (its lease ran out here): leave the job alone, and its worker
        to that replica when it could adopt it; else kill the worker."""
        if self.launcher.can_adopt(worker.handle.ref):
            # adopted, or re-queued: then the relaunch replaces it (a TrainJob of the same name)
            log.warning(
                "job %s: its lease was lost (taken over by another replica); worker %s is no longer "
                "watched here",
                worker.job_id,
                worker.handle.ref,
            )
            self._drop(worker, release=False)
            return
        log.warning(
            "job %s: its lease was lost (re-queued by another replica); killing worker %s",
            worker.job_id,
            worker.handle.ref,
        )
        self.launcher.kill(worker.handle)
        self._drop(worker)

    def _adopt(self, adopted: Adopted) -> None:
        """A dead replica's job whose worker runs on is this replica's now: watched like its own (its
        grant moved here with the lease). It may take this replica past max_concurrent_jobs for a while:
        then no new job starts here until it is below again."""
        job = adopted.job
        if job.id in self._workers:
            return  # its own, whose renewal was late: watched here already
        worker = self._workers[job.id] = _Worker(WorkerHandle(job.id, adopted.ref))
        log.info("job %s: watching worker %s, adopted (attempt %d)", job.id, adopted.ref, job.attempts)
        if adopted.drained:  # it stops for its last replica's drain: its exit is a drain's, not a crash
            self._stop(worker, DRAINING)

    def _drop(self, worker: _Worker, *, release: bool = True) -> None:
        """The worker is gone (or going; or another replica's now, `release` False): nothing of its job
        is held here any more."""
        del self._workers[worker.job_id]
        if release:
            self.launcher.release(worker.handle)  # stragglers: data-loader processes, etc.
        self._devices.release(worker.job_id)  # after the stragglers: nothing of the job is left on them
        # last: it writes to the job store, which may be away (then the stop goes on without it)
        self.intake.revoke(worker.job_id)  # this replica's grant only: an adopter's stays

    def _launch(self, job: Job) -> bool:
        """Start a worker for `job` (QUEUED, or RUNNING already when it was claimed with a lease)."""
        gpus = self.launcher.gpus_here(job)
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
        if devices is None:  # another job took the GPUs since the peek: give the claim back
            self._claims.give_back(job, "waiting for GPUs")
            return False  # busy: the oldest job waits for its GPUs, and the younger ones behind it
        started = False
        try:
            started = self._start_worker(job, devices)
        finally:
            if not started:  # whatever stopped it (a cancel, a failed launch, an error): nothing is held
                self._devices.release(job.id)
                self.intake.revoke(job.id)
                self._claims.give_back(job, "no worker was started")
        return started

    def _start_worker(self, job: Job, devices: tuple[int, ...]) -> bool:
        where = self.launcher.placement(devices)
        began = self._claims.begin(job, f"worker starting on {where}")
        if began is None:
            return False
        job = began
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

    def _enforce_stop(self, worker: _Worker) -> None:
        """Stop a worker whose job was cancelled; kill one that has not stopped within its grace."""
        if worker.stop_sent_at is None:
            if self.store.get_job(worker.job_id).cancel_requested:
                log.info("job %s: cancel requested, stopping worker %s", worker.job_id, worker.handle.ref)
                self._stop(worker, CANCELLED)
            return
        if worker.killed:
            return
        grace_s = self.settings.cancel_grace_s
        # an adopted worker stopping for its last replica's drain has the drain's grace to checkpoint,
        # unless its job has been cancelled since: then a cancel's
        if worker.stopped_for == DRAINING and not self.store.get_job(worker.job_id).cancel_requested:
            grace_s = self.settings.drain_grace_s
        if time.monotonic() - worker.stop_sent_at > grace_s:
            log.warning("job %s: worker did not stop within %.1f s; killing it", worker.job_id, grace_s)
            self._kill(worker)

    def _enforce_heartbeats(self, worker: _Worker) -> None:
        """A worker that stopped reporting (hung, frozen, cut off) is killed; its exit counts as a crash."""
        silent = self.intake.silent_for(worker.job_id)
        first = self.launcher.first_call()
        limit = self.settings.worker_silence_s
        reason = f"worker sent no heartbeat for {silent:.0f} s and was killed"
        if first is not None and not self.intake.has_called(worker.job_id):  # still waiting to start
            limit, reason = first.timeout_s, first.missed.format(silent=silent)
        if not worker.killed and silent > limit:
            log.warning("job %s: no heartbeat for %.0f s; killing its worker", worker.job_id, silent)
            worker.killed_for = reason
            self._kill(worker)

    def _on_exit(self, worker: _Worker, ended: WorkerExit, *, draining: bool) -> None:
        self._drop(worker)
        self._outcomes.settle(
            worker.job_id, worker.handle.ref, ended, draining=draining, killed_for=worker.killed_for
        )

    def _stop(self, worker: _Worker, reason: str) -> None:
        if worker.stop_sent_at is not None or worker.killed:
            return
        worker.stop_sent_at, worker.stopped_for = time.monotonic(), reason
        self.intake.request_stop(worker.job_id, reason)  # first: the worker asks its heartbeat why
        self.launcher.stop(worker.handle, reason)

    def _kill(self, worker: _Worker) -> None:
        worker.killed = True
        self.launcher.kill(worker.handle)
