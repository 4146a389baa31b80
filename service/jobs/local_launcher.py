"""The Launcher of a worker as a local child process, in its own process group.

Each attempt appends to the job's worker.log; a stop is SIGTERM to the group (the worker learns whether
it is a cancel or a drain from its heartbeat reply), a kill is SIGKILL to the group, and after the exit
the group is killed once more so no data-loader child outlives its worker.

With settings.warm_workers (default 1) the launcher keeps a spare worker ready (service.jobs.spare_worker):
`start` hands the job to it instead of spawning, and starts the next spare. The handed-over process is the
job's worker in every respect above (its pid names its own group, it appends to worker.log). A job starts
cold when there is no fitting spare: warm workers off, a custom worker command or argv (tests, torchrun),
a spare that died, or an environment other than the one the spare was started with. While the spare
is still importing, `worth_waiting` asks the scheduler to leave the job queued (and tells the spare to
skip its delay) rather than hand it over: a cancel meanwhile then costs no launch, and the spare stays.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from service.devices import VISIBLE_DEVICES, requested_gpus, visible_devices
from service.jobs.launcher import (
    REPORT_ADDRESS_ENV,
    FirstCall,
    LaunchError,
    WorkerExit,
    WorkerHandle,
    worker_env,
)
from service.jobs.spare_worker import Assignment, SpareWorker, spare_argv
from service.records import Job
from service.settings import Settings

log = logging.getLogger(__name__)

WorkerCommand = Callable[[str], Sequence[str]]
WORKER_MODULE = "service.worker_app"
SPARE_LOG = "spare-worker.log"  # in the state folder: what spares print before they have a job
# the next spare waits this long before importing: the CPUs are the new job's for its first steps
SPARE_DELAY_S = 3.0
SPARE_EARLY_DEATHS = 3  # spares that die before their job, in a row, before the launcher stops making them
# how long a job may wait for a spare to be ready: a cold worker's imports take ~3 s on an idle 2-core CPU
# and ~10 s on a loaded one, so a spare not ready after this is stuck, not slow; handed over anyway
# (it then starts the job whenever it is ready, as before the wait existed)
SPARE_READY_WAIT_S = 20.0


def worker_command(job_id: str) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, "--job-id", job_id]


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]


class LocalProcessLauncher:
    """Workers as child processes of this service (`command` makes the argv; tests wrap or replace it)."""

    def __init__(
        self, settings: Settings, command: WorkerCommand = worker_command, report_address: str | None = None
    ) -> None:
        """`report_address`: the reporting API's, which the first spare connects to before its job."""
        self.settings = settings
        self._command = command
        self._processes: dict[str, _Process] = {}
        self._lock = threading.Lock()
        self._spare: SpareWorker | None = None
        self._early_deaths = 0
        self._closed = False
        if self.warm:
            # at service start: the first job starts warm too
            address = {REPORT_ADDRESS_ENV: report_address} if report_address else {}
            self._make_spare({**worker_env(settings), **address})

    @property
    def warm(self) -> bool:
        """Spares are used: the setting is on and the worker is ours (not a test's command, not torchrun)."""
        return (
            self.settings.warm_workers > 0
            and self._command is worker_command
            and type(self).argv is LocalProcessLauncher.argv
        )

    def gpus_here(self, job: Job) -> int:
        return requested_gpus(job.spec, self.settings)  # a local worker's GPUs are all this machine's

    def placement(self, devices: tuple[int, ...]) -> str:
        return f"GPU {','.join(map(str, devices))}" if devices else "the CPU"

    def first_call(self) -> FirstCall | None:
        return None  # a local process runs at once

    def can_adopt(self, ref: str) -> bool:
        return False  # another replica's process: on its machine, not this one

    def worth_waiting(self, job: Job, env: Mapping[str, str]) -> bool:
        """The spare fits `env` and is importing (told to hurry now), not ready yet, for at most
        SPARE_READY_WAIT_S: starting the job now would hand it over all the same (and start the next
        spare), only earlier, so a cancel meanwhile would cost two processes."""
        if not self.warm:
            return False
        with self._lock:
            spare = self._spare
        if spare is None or spare.ready or not spare.alive or not spare.fits(env):
            return False  # nothing better is coming: start() hands over, or starts cold and makes a spare
        waited = spare.nudge()
        if waited >= SPARE_READY_WAIT_S:
            log.warning(
                "spare worker %d not ready after %.0f s; job %s is handed to it anyway",
                spare.pid,
                waited,
                job.id,
            )
            return False
        return True

    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        log_file: IO[bytes] | None = None
        try:
            # the worker sees only its own GPUs (cuda:0 is the first of them); a CPU job sees none
            env = {**env, VISIBLE_DEVICES: visible_devices(devices, os.environ.get(VISIBLE_DEVICES))}
            job_dir = self.settings.job_dir(job.id)
            job_dir.mkdir(parents=True, exist_ok=True)
            log_path = job_dir.resolve() / "worker.log"
            log_file = open(log_path, "ab")  # noqa: SIM115 (closed in release())
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"\n=== attempt {job.attempts} at {stamp} ===\n".encode())
            log_file.flush()
            popen = self._from_spare(Assignment(job.id, str(log_path), dict(env)))
            if popen is None:
                popen = subprocess.Popen(
                    self.argv(job),
                    env=dict(env),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: a stop reaches its children
                )
        except (OSError, IndexError) as exc:
            # IndexError: more GPUs configured than the service's own CUDA_VISIBLE_DEVICES lists
            if log_file is not None:
                log_file.close()
            raise LaunchError(f"{type(exc).__name__}: {exc}") from exc
        handle = WorkerHandle(job.id, str(popen.pid))
        with self._lock:
            self._processes[handle.ref] = _Process(popen, log_file)
        return handle

    def close(self) -> None:
        """End the spare, if any (the workers of jobs are the scheduler's to stop). Idempotent."""
        with self._lock:
            spare, self._spare, self._closed = self._spare, None, True
        if spare is not None:
            spare.close()

    def spare_pid(self) -> int | None:
        """The pid of the spare waiting for the next job, if there is one."""
        with self._lock:
            return None if self._spare is None else self._spare.pid

    def _from_spare(self, assignment: Assignment) -> subprocess.Popen[bytes] | None:
        """The spare, now running `assignment`'s job, and the next spare started; None: start it cold."""
        if not self.warm:
            return None
        with self._lock:
            spare, self._spare = self._spare, None
        popen = None
        if spare is not None and spare.fits(assignment.env):
            popen = spare.take(assignment)
            self._early_deaths = 0 if popen is not None else self._early_deaths + 1
            if popen is None:
                spare.close()  # reaped: it died before its job (its log says why)
        elif spare is not None:
            log.info(
                "the spare worker was started with another environment; job %s starts cold", assignment.job_id
            )
            spare.close()
        if self._early_deaths < SPARE_EARLY_DEATHS:
            self._make_spare(assignment.env, SPARE_DELAY_S)
        elif self._early_deaths == SPARE_EARLY_DEATHS:
            log.error(
                "%d spare workers in a row died before their job (see %s); jobs start cold from now on",
                SPARE_EARLY_DEATHS,
                self.settings.state_dir / SPARE_LOG,
            )
            self._early_deaths += 1  # said once
        return popen

    def _make_spare(self, env: Mapping[str, str], delay_s: float = 0.0) -> None:
        """Start the next spare with `env` (less the per-launch part); failing only means cold starts."""
        try:
            spare = SpareWorker(
                spare_argv(worker_command("")), env, self.settings.state_dir / SPARE_LOG, delay_s
            )
        except OSError as exc:
            log.warning("could not start a spare worker (jobs start cold): %s", exc)
            return
        with self._lock:
            kept = not self._closed
            if kept:
                self._spare = spare
        if not kept:  # closed meanwhile
            spare.close()

    def argv(self, job: Job) -> list[str]:
        """The worker's command line (the torchrun launcher wraps it)."""
        return list(self._command(job.id))

    def poll(self, handle: WorkerHandle) -> WorkerExit | None:
        code = self._process(handle).popen.poll()
        return None if code is None else WorkerExit(code, describe_exit(code))

    def stop(self, handle: WorkerHandle, reason: str) -> None:
        _kill_group(int(handle.ref), signal.SIGTERM)

    def kill(self, handle: WorkerHandle) -> None:
        _kill_group(int(handle.ref), signal.SIGKILL)

    def release(self, handle: WorkerHandle) -> None:
        _kill_group(int(handle.ref), signal.SIGKILL)  # stragglers: data-loader processes, etc.
        with self._lock:
            process = self._processes.pop(handle.ref, None)
        if process is not None:
            process.popen.wait()
            process.log_file.close()

    def stop_leftover(self, job_id: str, ref: str, grace_s: float) -> None:
        if not ref.isdigit():
            return  # not a process of ours (another launcher's worker)
        pid = int(ref)
        if not _runs_job(pid, job_id, self.settings.job_dir(job_id).resolve() / "worker.log"):
            return  # gone, or the pid was reused by something else
        log.warning("stopping worker %d of job %s left by the previous service", pid, job_id)
        _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        _kill_group(pid, signal.SIGKILL)

    def _process(self, handle: WorkerHandle) -> _Process:
        with self._lock:
            return self._processes[handle.ref]


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


def _runs_job(pid: int, job_id: str, log_path: Path) -> bool:
    """The process `pid` is a worker of `job_id`: its command line says `... --job-id <job_id>`, or (a
    spare that took the job, whose command line is `--spare`) its stdout is the job's worker.log."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone (or not Linux: nothing to check against)
    if any(a == b"--job-id" and b == job_id.encode() for a, b in itertools.pairwise(argv)):
        return True
    try:
        return os.readlink(f"/proc/{pid}/fd/1") == str(log_path)
    except OSError:
        return False


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
