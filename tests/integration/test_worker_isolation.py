"""No training process opens the job store: a job succeeds through the real service while its worker
runs under an audit hook that kills it on any open of jobs.sqlite3, with no store path in its environment,
and without the store's module imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from harness import channel_to, make_image_folder, make_settings, spec, stub, wait_state

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.app import start_service
from service.jobs.launcher import WorkerHandle
from service.jobs.local_launcher import WORKER_MODULE, LocalProcessLauncher
from service.records import Job

AUDITED = Path(__file__).with_name("audited.py")

pytestmark = pytest.mark.timeout(300)


def audited_command(job_id: str) -> list[str]:
    return [sys.executable, str(AUDITED), WORKER_MODULE, "--job-id", job_id]


class RecordingLauncher(LocalProcessLauncher):
    """The local launcher, keeping the environment each worker was given."""

    envs: list[dict[str, str]]

    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        self.envs.append(dict(env))
        return super().start(job, devices, env)


def test_the_audit_hook_stops_a_process_that_opens_a_job_store(tmp_path: Path) -> None:
    probe = f"import audited, sqlite3; audited.install(); sqlite3.connect({str(tmp_path / 'jobs.sqlite3')!r})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(AUDITED.parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 86 and "AUDIT: sqlite3.connect of the job store" in done.stderr


def test_a_job_succeeds_while_its_worker_never_opens_the_store(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    make_image_folder(settings.data_root / "ds")
    launcher = RecordingLauncher(settings, command=audited_command)
    launcher.envs = []
    service = start_service(settings, launcher=launcher)
    try:
        with channel_to(service) as channel:
            client = stub(channel)
            job = client.CreateJob(pb.CreateJobRequest(spec=spec("isolated", serving={"enabled": False})))
            done = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
    finally:
        service.stop(drain=False)
    worker_log = (settings.job_dir(job.id) / "worker.log").read_text()
    assert "AUDIT:" not in worker_log
    assert done.state == pb.SUCCEEDED, done.error
    assert done.result.archive_path and Path(done.result.archive_path).is_file()  # trained and packaged
    [env] = launcher.envs
    store_path = str(settings.jobs_db.resolve())
    assert not [k for k, v in env.items() if store_path in v or "jobs.sqlite3" in v]
    assert "STORE MODULES: []" in worker_log, worker_log[-2000:]
    modules_line = next(line for line in worker_log.splitlines() if line.startswith("STORE MODULES:"))
    assert json.loads(modules_line.split(":", 1)[1]) == []
