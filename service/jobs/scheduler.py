"""The scheduler: runs queued jobs in worker processes, at most N at once, oldest first.

It owns the worker processes and decides what each exit means (see service.jobs.worker for the exit
codes): a packaged job is handed to the deployer and SUCCEEDS; a crash is retried from the last
checkpoint up to `max_job_retries` times, then FAILS with the reason; a cancelled job is stopped
(SIGTERM to its process group, SIGKILL after `cancel_grace_s`) and CANCELLED. drain() stops starting
jobs, asks the running ones to checkpoint and stop, and re-queues them to resume after a restart.

Each worker gets its own GPUs (service.devices): distinct indices from the allocator, in its
CUDA_VISIBLE_DEVICES, given back when the worker exits, however it exits. The oldest queued job waits
while its GPUs are busy, and the younger ones wait behind it.

The polling thread is supervised: `healthy()` (called by the service's health probe) restarts it when
it has died and reports unhealthy until the new thread has completed a tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydantic import SecretStr

from service.devices import VISIBLE_DEVICES, DeviceAllocator, requested_gpus, visible_devices
from service.errors import FailedPrecondition
from service.jobs.store import ACTIVE_STATES, JobStore
from service.jobs.worker import EXIT_OK, one_line
from service.records import EventKind, Job, JobState
from service.settings import Settings

log = logging.getLogger(__name__)

Deployer = Callable[[Job], None]  # serves a PACKAGING job's archive; raises when it cannot
WorkerCommand = Callable[[str], Sequence[str]]
POLL_S = 0.25
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def worker_command(job_id: str) -> list[str]:
    return [sys.executable, "-m", "service.jobs.worker", "--job-id", job_id]


@dataclass
class _Worker:
    job_id: str
    process: subprocess.Popen[bytes]
    log_file: IO[bytes]
    stop_sent_at: float | None = None  # when SIGTERM went to its process group
    killed: bool = False


class Scheduler:
    """Starts, watches and stops worker processes; one polling thread does all of it."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        *,
        deployer: Deployer | None = None,
        command: WorkerCommand = worker_command,
        poll_s: float = POLL_S,
    ) -> None:
        self.settings = settings
        self.store = store
        self.deployer = deployer
        self._command = command
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

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Stop workers a dead predecessor left behind, re-queue their jobs, and start scheduling."""
        self._capacity = self.settings.resolved_max_concurrent_jobs()
        self._env = worker_env(self.settings)
        self._devices = DeviceAllocator(self.settings.training_gpus)
        for job in self.store.jobs_in(ACTIVE_STATES):
            pid = self.store.worker_pid(job.id)
            if pid is not None:
                stop_stale_worker(pid, job.id, self.settings.cancel_grace_s)
        for job in self.store.requeue_interrupted():
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
        """Ids of the jobs that have a worker process right now."""
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
            self._signal(worker, signal.SIGTERM if drain else signal.SIGKILL)
        deadline = time.monotonic() + grace
        while self._workers:
            for worker in list(self._workers.values()):
                if worker.process.poll() is not None:
                    self._on_exit(worker, draining=True)
                elif time.monotonic() > deadline and not worker.killed:
                    log.warning("job %s did not stop within %.0f s; killing it", worker.job_id, grace)
                    self._signal(worker, signal.SIGKILL)
            time.sleep(0.05)
        self._deploys.shutdown(wait=True)

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

    def _tick(self) -> None:
        for worker in list(self._workers.values()):
            if worker.process.poll() is not None:
                self._on_exit(worker, draining=False)
            else:
                self._enforce_cancel(worker)
        while len(self._workers) < self._capacity and not self._stopping.is_set():
            job = self.store.next_queued(exclude=list(self._workers))
            if job is None or not self._launch(job):
                break

    def _launch(self, job: Job) -> bool:
        gpus = requested_gpus(job.spec, self.settings)
        # admitted when the service had more GPUs (before a restart): it would wait forever
        if gpus > len(self._devices.devices):
            reason = (
                f"resources.gpus {gpus} is more than the {len(self._devices.devices)} GPU(s) this service "
                "trains on now; resubmit the job with fewer"
            )
            try:
                self.store.transition(job.id, JobState.FAILED, reason, expect=[JobState.QUEUED])
            except FailedPrecondition:  # cancelled meanwhile
                return False
            return True  # the next queued job may start
        devices = self._devices.acquire(job.id, gpus)
        if devices is None:
            return False  # busy: the oldest job waits for its GPUs, and the younger ones behind it
        started = False
        try:
            started = self._start_worker(job, devices)
        finally:
            if not started:  # whatever stopped it (a cancel, a failed Popen, an error): nothing is held
                self._devices.release(job.id)
        return started

    def _start_worker(self, job: Job, devices: tuple[int, ...]) -> bool:
        where = f"GPU {','.join(map(str, devices))}" if devices else "the CPU"
        try:
            job = self.store.transition(
                job.id, JobState.RUNNING, f"worker starting on {where}", expect=[JobState.QUEUED]
            )
        except FailedPrecondition:  # cancelled between the queue read and now: look again next tick
            return False
        log_file: IO[bytes] | None = None
        try:
            # the worker sees only its own GPUs (cuda:0 is the first of them); a CPU job sees none
            env = {**self._env, VISIBLE_DEVICES: visible_devices(devices, os.environ.get(VISIBLE_DEVICES))}
            job_dir = self.settings.job_dir(job.id)
            job_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(job_dir / "worker.log", "ab")  # noqa: SIM115 (closed when the worker exits)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"\n=== attempt {job.attempts} at {stamp} ===\n".encode())
            log_file.flush()
            process = subprocess.Popen(
                list(self._command(job.id)),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a cancel reaches its children
            )
        except (OSError, IndexError) as exc:
            # the job is RUNNING already: without a worker it would stay so for ever, out of a cancel's
            # reach (IndexError: more GPUs configured than the service's own CUDA_VISIBLE_DEVICES lists)
            if log_file is not None:
                log_file.close()
            self.store.transition(job.id, JobState.FAILED, f"could not start a worker: {one_line(exc)}")
            return False
        self.store.set_worker_pid(job.id, process.pid)
        self._workers[job.id] = _Worker(job.id, process, log_file)
        log.info("job %s: worker %d started on %s (attempt %d)", job.id, process.pid, where, job.attempts)
        return True

    def _enforce_cancel(self, worker: _Worker) -> None:
        if worker.stop_sent_at is None:
            if self.store.get_job(worker.job_id).cancel_requested:
                log.info("job %s: cancel requested, stopping worker %d", worker.job_id, worker.process.pid)
                self._signal(worker, signal.SIGTERM)
        elif not worker.killed and time.monotonic() - worker.stop_sent_at > self.settings.cancel_grace_s:
            log.warning(
                "job %s: worker ignored SIGTERM for %.0f s; killing it",
                worker.job_id,
                self.settings.cancel_grace_s,
            )
            self._signal(worker, signal.SIGKILL)

    # ------------------------------------------------------------------ what an exit means

    def _on_exit(self, worker: _Worker, *, draining: bool) -> None:
        del self._workers[worker.job_id]
        rc = worker.process.returncode
        _kill_group(worker.process.pid, signal.SIGKILL)  # stragglers: data-loader processes, etc.
        self._devices.release(worker.job_id)  # after the stragglers: nothing of the job is left on them
        worker.log_file.close()
        job = self.store.get_job(worker.job_id)
        log.info("job %s: worker %d exited with %s (job %s)", job.id, worker.process.pid, rc, job.state)
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
            else:
                self._retry_or_fail(job, describe_exit(rc))
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

    def _signal(self, worker: _Worker, sig: signal.Signals) -> None:
        if sig == signal.SIGKILL:
            worker.killed = True
        elif worker.stop_sent_at is None:
            worker.stop_sent_at = time.monotonic()
        else:
            return
        _kill_group(worker.process.pid, sig)


# ---------------------------------------------------------------------- processes


def describe_exit(returncode: int) -> str:
    """`worker killed by SIGKILL (exit -9)` / `worker exited with code 3`."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
        return f"worker killed by {name} (exit {returncode}){hint}"
    return f"worker exited with code {returncode} without finishing (see the job's worker.log)"


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a worker: ours, with every setting spelled out as TUNESERVE_* (paths absolute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None or isinstance(value, SecretStr):
            continue  # secrets stay in the server process
        if isinstance(value, Path):
            value = value.resolve()
        env[f"TUNESERVE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    # the worker imports `service` from the same tree as the server, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def stop_stale_worker(pid: int, job_id: str, grace_s: float) -> None:
    """Stop a worker of `job_id` left running by a service that died (checked by its command line)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # gone (or not Linux: nothing to check against)
    if b"service.jobs.worker" not in cmdline or job_id.encode() not in cmdline:
        return  # the pid was reused by something else
    log.warning("stopping worker %d of job %s left by the previous service", pid, job_id)
    _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    _kill_group(pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
