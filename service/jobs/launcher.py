"""The Launcher seam: how a job's worker is started, watched and stopped, wherever it runs.

The scheduler decides *when* a worker runs and what its exit *means*; a Launcher only knows *how*: a
local child process today (service.jobs.local_launcher), torchrun or a Kubernetes TrainJob tomorrow.
So a handle names a worker without being a pid, a stop is a request the worker acts on at its next safe
point, and an exit is a status with a description for people.

The worker's side of the contract, whatever launches it:
  exit 0            trained and packaged; the job is PACKAGING and ready to be served
  exit 75           stopped on request at a safe point, checkpoint saved (resumable)
  exit 1            failed; the worker has already reported FAILED with the reason
  anything else     a crash (signal, OOM kill): the scheduler retries from the last checkpoint
It reads its job and reports through the internal reporting API at REPORT_ADDRESS_ENV, with the
job-scoped secret in REPORT_TOKEN_ENV (both in the environment the launcher is given).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from service.records import Job
from service.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable
EXIT_PEER_LOST = 76  # DDP: another rank died; not reported, so the scheduler retries it as a crash

# Not settings: the address is known only once the reporting server is bound, and the token is a secret
# made for one launch (it must never reach a log or another job's worker).
REPORT_ADDRESS_ENV = "TUNESERVE_REPORT_ADDRESS"
REPORT_TOKEN_ENV = "TUNESERVE_REPORT_TOKEN"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class WorkerHandle:
    """One launched worker. `ref` is what names it to its launcher (a process group, a pod, a TrainJob);
    the store keeps it so that a restarted service can stop what its predecessor left running."""

    job_id: str
    ref: str


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended: its exit code (see the module docstring) and, for people, what happened."""

    code: int
    description: str


@dataclass(frozen=True)
class FirstCall:
    """How long a launcher's workers may take to make their first call, for launchers whose workers may
    wait long before they run (a TrainJob's pods wait for the cluster's GPUs and their image), and the
    reason a job records when they never call (`{silent}`: the seconds waited)."""

    timeout_s: float
    missed: str


class LaunchError(Exception):
    """The worker could not be started (the job is failed with this message)."""


class Launcher(Protocol):
    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        """Start the worker of `job` on `devices` (GPU indices of this service; () for the CPU) with `env`.
        Raises LaunchError when it cannot."""

    def poll(self, handle: WorkerHandle) -> WorkerExit | None:
        """The worker's exit once it has ended, else None."""

    def stop(self, handle: WorkerHandle, reason: str) -> None:
        """Ask the worker to checkpoint and exit (reason: "cancelled" or "draining"). Returns at once."""

    def kill(self, handle: WorkerHandle) -> None:
        """End the worker now, without waiting for a safe point."""

    def release(self, handle: WorkerHandle) -> None:
        """After the exit: end what the worker left behind (child processes, pods) and forget it."""

    def stop_leftover(self, job_id: str, ref: str, grace_s: float) -> None:
        """On start-up: stop the worker `ref` of `job_id` a dead predecessor left running, if it still runs
        (checkpoint within `grace_s`, then killed). Anything else that `ref` names now is left alone."""

    def gpus_here(self, job: Job) -> int:
        """How many of this service's GPUs (settings.training_gpus) the worker of `job` holds: what the
        scheduler allocates and passes to start(). 0 where its GPUs are somewhere else (a cluster's)."""

    def placement(self, devices: tuple[int, ...]) -> str:
        """Where a worker given `devices` runs, for people ("GPU 0,1", "the CPU", a namespace)."""

    def worth_waiting(self, job: Job, env: Mapping[str, str]) -> bool:
        """True: `job`'s worker would start sooner if the scheduler left the job QUEUED for now (a warm
        worker for it is on its way); the scheduler asks again soon. The launcher bounds how long it
        answers True. False wherever waiting gains nothing: nothing warm is coming (cold starts, pods)."""

    def first_call(self) -> FirstCall | None:
        """A longer wait for a worker's first call than for any later silence; None: no longer
        (settings.worker_silence_s from the start)."""

    def can_adopt(self, ref: str) -> bool:
        """True: the worker `ref` that another replica launched runs on without it and can be watched,
        stopped and released from here (a TrainJob in this service's namespace; it holds none of this
        machine's GPUs), so a replica that takes over the job after that replica died keeps it training
        instead of restarting it. False for a local process: it lived (and died) with its replica."""


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
