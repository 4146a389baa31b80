"""Launchers for DDP jobs on this machine: torchrun, and the one place that picks a launcher per job.

`TorchrunLauncher` starts `torchrun --standalone --nproc-per-node N --max-restarts 0 -m service.worker_app`
as a local child process in its own process group (everything else as LocalProcessLauncher: worker.log,
SIGTERM/SIGKILL, the /proc check on restart, which finds `--job-id` on torchrun's command line too).
torchrun puts each rank in a session of its own and, on SIGTERM, passes SIGTERM to every rank: the
ranks agree to stop at the same step and exit 75. A rank that dies makes torchrun end the others and
exit non-zero (--max-restarts 0: no elastic restart); the scheduler's retry then resumes the whole job
from its last checkpoint. A rank dies with torchrun (PR_SET_PDEATHSIG, set by service.worker_app), so
a SIGKILL to torchrun's group leaves no rank behind.

`ByWorldSize` routes each job: world size 1 to the local process launcher (the single-process path as
before), more to torchrun.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping

from service.jobs.launcher import FirstCall, Launcher, WorkerExit, WorkerHandle
from service.jobs.local_launcher import WORKER_MODULE, LocalProcessLauncher
from service.records import Job


class TorchrunLauncher(LocalProcessLauncher):
    """A job's ranks under torchrun, one process per GPU (or per resources.processes_per_node on the CPU)."""

    def argv(self, job: Job) -> list[str]:
        worker = super().argv(job)
        # the worker command, less its interpreter and `-m <module>`: torchrun runs the module itself
        module_args = worker[worker.index(WORKER_MODULE) + 1 :] if WORKER_MODULE in worker else worker
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(job.spec.resources.processes), "--max-restarts", "0",
            "-m", WORKER_MODULE, *module_args,
        ]  # fmt: skip


class ByWorldSize:
    """The Launcher the scheduler sees: single-process jobs to `single`, DDP jobs to `ddp`."""

    def __init__(self, single: Launcher, ddp: Launcher) -> None:
        self.single, self.ddp = single, ddp
        self._chosen: dict[str, Launcher] = {}  # by ref
        self._lock = threading.Lock()

    def launcher_for(self, job: Job) -> Launcher:
        return self.ddp if job.spec.resources.world_size > 1 else self.single

    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        launcher = self.launcher_for(job)
        handle = launcher.start(job, devices, env)
        with self._lock:
            self._chosen[handle.ref] = launcher
        return handle

    def poll(self, handle: WorkerHandle) -> WorkerExit | None:
        return self._of(handle).poll(handle)

    def stop(self, handle: WorkerHandle, reason: str) -> None:
        self._of(handle).stop(handle, reason)

    def kill(self, handle: WorkerHandle) -> None:
        self._of(handle).kill(handle)

    def release(self, handle: WorkerHandle) -> None:
        self._of(handle).release(handle)
        with self._lock:
            self._chosen.pop(handle.ref, None)

    def gpus_here(self, job: Job) -> int:
        return self.launcher_for(job).gpus_here(job)

    def placement(self, devices: tuple[int, ...]) -> str:
        return self.single.placement(devices)  # both run here, on the same devices

    def worth_waiting(self, job: Job, env: Mapping[str, str]) -> bool:
        return self.launcher_for(job).worth_waiting(job, env)  # torchrun's: never (it has no spare)

    def first_call(self) -> FirstCall | None:
        return self.single.first_call()  # both start local processes

    def can_adopt(self, ref: str) -> bool:
        return self.single.can_adopt(ref)  # both start local processes

    def stop_leftover(self, job_id: str, ref: str, grace_s: float) -> None:
        # both are local process groups named by pid: either launcher stops what the other left
        self.single.stop_leftover(job_id, ref, grace_s)

    def close(self) -> None:
        """End what the launchers hold for no job (the local launcher's spare worker)."""
        for launcher in (self.single, self.ddp):
            close = getattr(launcher, "close", None)
            if callable(close):
                close()

    def _of(self, handle: WorkerHandle) -> Launcher:
        with self._lock:
            return self._chosen[handle.ref]
