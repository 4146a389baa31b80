"""A STAND-IN for the Trainer controller and kubelet, for tests only: it runs each TrainJob that the
stand-in API server (tests/k8s_api_standin.py) holds as one local process, and writes back its outcome.

What it keeps of Kubernetes: the container's environment is the TrainJob's `spec.trainer.env`, with each
`secretKeyRef` resolved from the Secrets in the API server (a container whose Secret is not there yet
waits for it, as the kubelet retries); the exit is written as the TrainJob's `Complete` (exit 0) or
`Failed` condition; a TrainJob deleted while it runs has its process killed. What it does not: one
process per TrainJob whatever numNodes says, no torchrun, no PET_* variables, and `command` replaces the
TrainJob's command (the scheduler tests' stand-in worker, tests/unit/fake_worker.py).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from k8s_api_standin import StandInApiServer

POLL_S = 0.05
REPO = Path(__file__).resolve().parents[1]  # the image's `service` package


class PodRunner:
    """Runs the TrainJobs of `namespace` as `command + ["--job-id", <the TrainJob's --job-id>]`."""

    def __init__(self, api: StandInApiServer, namespace: str, command: Sequence[str]) -> None:
        self.api, self.namespace, self.command = api, namespace, list(command)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.finished: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-runner", daemon=True)

    def __enter__(self) -> PodRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            jobs = self.api.trainjobs(self.namespace)
            for name, trainjob in jobs.items():
                if name not in self.processes:
                    self._start(name, trainjob)
            for name, process in list(self.processes.items()):
                if name in self.finished:
                    continue
                if name not in jobs:  # deleted: the pod goes with it
                    process.kill()
                    process.wait()
                    self.finished.add(name)
                elif process.poll() is not None:
                    self.finished.add(name)
                    code = process.returncode
                    if code == 0:
                        self.api.set_condition(self.namespace, name, "Complete", "JobSetCompleted")
                    else:
                        message = f"jobset {name} failed: pod {name}-node-0 exited with {code}"
                        self.api.set_condition(self.namespace, name, "Failed", "JobSetFailed", message)

    def _start(self, name: str, trainjob: dict[str, Any]) -> None:
        env = self._env(trainjob["spec"]["trainer"].get("env", []))
        if env is None:
            return  # its Secret is not there yet: look again next time
        argv = trainjob["spec"]["trainer"]["command"]
        job_id = argv[argv.index("--job-id") + 1]
        self.processes[name] = subprocess.Popen(
            [*self.command, "--job-id", job_id], env=env, stdin=subprocess.DEVNULL
        )

    def _env(self, entries: list[dict[str, Any]]) -> dict[str, str] | None:
        # the image's own environment (PATH, PYTHONPATH), none of the control plane's settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
        env["PYTHONPATH"] = str(REPO)
        secrets = self.api.secrets(self.namespace)
        for entry in entries:
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            ref = entry["valueFrom"]["secretKeyRef"]
            secret = secrets.get(ref["name"])
            if secret is None:
                return None
            env[entry["name"]] = secret["stringData"][ref["key"]]
        return env
