"""The spare worker: one worker process kept ready, torch and the engine imported, waiting for a job.

A cold worker spends seconds importing torch, torchvision and the engine before its first training step.
The local launcher (service.jobs.local_launcher) therefore keeps one spare started ahead of need, in its
own process group, as `python -m service.worker_app --spare`. Handing it a job is one JSON line on its
stdin (`Assignment`): the job id, the job's worker.log and the job's whole environment (the report token
and CUDA_VISIBLE_DEVICES included), which the spare puts in place of its own before it reads any setting.

Why a spare process rather than multiprocessing's forkserver: a forkserver's children are the server's,
not the service's (their exit codes come back through multiprocessing, not Popen) and run a Python
function, not `python -m service.worker_app`; a spare is an ordinary child (Popen) like a cold worker, so
stop/kill/poll, its own process group and the /proc checks behave exactly as for a cold one, and the
service process itself imports nothing more.

CUDA: the environment (CUDA_VISIBLE_DEVICES) must be in place before torch initialises CUDA, so the
spare imports torch but never calls into torch.cuda before its assignment; it checks that on itself and
exits rather than wait when something did (the launcher then starts that job cold). It starts with
CUDA_VISIBLE_DEVICES empty, so even a stray initialisation would see no GPU rather than another job's.

The reporting API's address (not a secret; the token is, and comes with the job) is in the spare's
environment when the launcher knows it: the spare connects its channel while it waits
(service.api.report_client.ReadyChannel), so the job's first reports do not wait for a connection.

The spare made right after a job was handed over waits a few seconds (or until a job comes) before it
imports: on a small machine its imports would otherwise take CPU from that job's first steps. A blank
line on its stdin (`nudge`) ends that wait at once: a job is waiting for it, nothing is gained by it.

Ready: once imported (and connected), the spare writes one byte on a pipe of its own (READY_FLAG names
its fd). The scheduler leaves a queued job QUEUED while the spare is on its way
(LocalProcessLauncher.worth_waiting): a cancel meanwhile is a state change, not a launch and a kill.

An idle spare dies with the service: it is killed with its parent (PR_SET_PDEATHSIG) and it exits at
the end of its stdin. Once assigned it is a worker like any other and outlives the service the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO

from service.devices import VISIBLE_DEVICES
from service.jobs.launcher import REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV

log = logging.getLogger(__name__)

SPARE_FLAG = "--spare"
DELAY_FLAG = "--spare-delay"
READY_FLAG = "--ready-fd"  # the spare writes READY_BYTE there once its imports are done
READY_BYTE = b"r"
NUDGE = b"\n"  # a blank line on the spare's stdin: start importing now (an assignment is never blank)
# set for each launch, so a spare made before the job exists cannot have them: not compared
PER_LAUNCH_ENV = frozenset({REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV, VISIBLE_DEVICES})


@dataclass(frozen=True)
class Assignment:
    """What turns a spare into a job's worker (one JSON line on its stdin)."""

    job_id: str
    log_path: str  # absolute: the job's worker.log, opened for appending
    env: dict[str, str]
    sent_at: float = 0.0  # when the launcher handed it over (wall clock): bench/latency.py's parts

    def encode(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def decode(cls, line: bytes) -> Assignment:
        fields = json.loads(line)
        env = {str(k): str(v) for k, v in fields["env"].items()}
        return cls(str(fields["job_id"]), str(fields["log_path"]), env, float(fields.get("sent_at", 0.0)))


def comparable_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less what differs per launch: two workers with equal comparable envs import the same way."""
    return {k: v for k, v in env.items() if k not in PER_LAUNCH_ENV}


class SpareWorker:
    """One spare worker process (launcher side). `take` hands it a job; `close` ends it unused."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path, delay_s: float = 0.0) -> None:
        """`delay_s`: the spare waits this long (or until a job comes) before it imports anything."""
        self.env = comparable_env(env)
        self._ready = False
        self._nudged_at: float | None = None  # monotonic: when a waiting job first asked for it
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in take() or close())
        self._ready_fd, ready_w = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [*argv, SPARE_FLAG, DELAY_FLAG, str(delay_s), READY_FLAG, str(ready_w)],
                env={**self.env, **_address_of(env), VISIBLE_DEVICES: ""},
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a cold worker's
                pass_fds=(ready_w,),
            )
        except OSError:
            self._log.close()
            os.close(self._ready_fd)
            raise
        finally:
            os.close(ready_w)  # the spare's end: its exit then reads as EOF here
        os.set_blocking(self._ready_fd, False)  # read from the scheduler's tick: never wait on it
        log.debug("spare worker %d starting", self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def ready(self) -> bool:
        """The spare has imported everything and waits for its job (it said so on its ready pipe)."""
        if not self._ready and self._ready_fd >= 0:
            with contextlib.suppress(BlockingIOError):  # nothing yet; b"": it exited without being ready
                self._ready = os.read(self._ready_fd, 1) == READY_BYTE
        return self._ready

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def nudge(self) -> float:
        """Tell the spare a job waits for it (it ends its delay and imports now); the seconds since it was
        first told so (0.0 the first time)."""
        now = time.monotonic()
        if self._nudged_at is None:
            self._nudged_at = now
            with contextlib.suppress(OSError, ValueError):  # gone: take() finds out and starts the job cold
                if self.popen.stdin is not None:
                    self.popen.stdin.write(NUDGE)
                    self.popen.stdin.flush()
        return now - self._nudged_at

    def fits(self, env: Mapping[str, str]) -> bool:
        """The spare was started with the environment `env` gives a worker (less the per-launch part)."""
        return comparable_env(env) == self.env

    def take(self, assignment: Assignment) -> subprocess.Popen[bytes] | None:
        """Hand the job to the spare: its process, now the job's worker; None when the spare is gone."""
        self._log.close()  # the spare's own log: from now on it writes to the job's worker.log
        self._close_ready()
        stdin = self.popen.stdin
        if self.popen.poll() is not None or stdin is None:
            log.warning("the spare worker %d had exited (code %s)", self.pid, self.popen.returncode)
            return None
        try:
            stdin.write(replace(assignment, sent_at=time.time()).encode())
            stdin.close()  # the spare reads one line: the end of its stdin is no news to it
        except OSError as exc:  # BrokenPipeError: it died just now
            log.warning("the spare worker %d could not take job %s: %s", self.pid, assignment.job_id, exc)
            with contextlib.suppress(OSError):
                stdin.close()
            return None
        return self.popen

    def close(self) -> None:
        """End an unused spare (its whole group) and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        self.popen.wait()
        self._log.close()
        self._close_ready()

    def _close_ready(self) -> None:
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1


def _address_of(env: Mapping[str, str]) -> dict[str, str]:
    """The reporting API's address, if `env` has it: the spare connects to it before its job (no secret,
    unlike the token, which it never gets before its assignment)."""
    address = env.get(REPORT_ADDRESS_ENV)
    return {} if not address else {REPORT_ADDRESS_ENV: address}


def spare_argv(worker_argv: list[str]) -> list[str]:
    """The spare's command line: the worker's, less `--job-id ID` (the job comes later)."""
    if "--job-id" in worker_argv:
        at = worker_argv.index("--job-id")
        return worker_argv[:at] + worker_argv[at + 2 :]
    return list(worker_argv)
