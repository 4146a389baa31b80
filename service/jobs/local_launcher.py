"""The Launcher of a worker as a local child process, in its own process group.

Each attempt appends to the job's worker.log; a stop is SIGTERM to the group (the worker learns whether
it is a cancel or a drain from its heartbeat reply), a kill is SIGKILL to the group, and after the exit
the group is killed once more so no data-loader child outlives its worker.
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

from service.devices import VISIBLE_DEVICES, visible_devices
from service.jobs.launcher import LaunchError, WorkerExit, WorkerHandle
from service.records import Job
from service.settings import Settings

log = logging.getLogger(__name__)

WorkerCommand = Callable[[str], Sequence[str]]
WORKER_MODULE = "service.worker_app"


def worker_command(job_id: str) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, "--job-id", job_id]


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]


class LocalProcessLauncher:
    """Workers as child processes of this service (`command` makes the argv; tests wrap or replace it)."""

    def __init__(self, settings: Settings, command: WorkerCommand = worker_command) -> None:
        self.settings = settings
        self._command = command
        self._processes: dict[str, _Process] = {}
        self._lock = threading.Lock()

    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        log_file: IO[bytes] | None = None
        try:
            # the worker sees only its own GPUs (cuda:0 is the first of them); a CPU job sees none
            env = {**env, VISIBLE_DEVICES: visible_devices(devices, os.environ.get(VISIBLE_DEVICES))}
            job_dir = self.settings.job_dir(job.id)
            job_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(job_dir / "worker.log", "ab")  # noqa: SIM115 (closed in release())
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"\n=== attempt {job.attempts} at {stamp} ===\n".encode())
            log_file.flush()
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
        if not _runs_job(pid, job_id):
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


def _runs_job(pid: int, job_id: str) -> bool:
    """The process `pid` is a worker of `job_id`, judged by its command line (`... --job-id <job_id>`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone (or not Linux: nothing to check against)
    return any(a == b"--job-id" and b == job_id.encode() for a, b in itertools.pairwise(argv))


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
