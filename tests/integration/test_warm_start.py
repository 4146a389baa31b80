"""The spare worker (service.jobs.spare_worker): a job runs on the process started before it existed, the
next job gets a fresh spare, a cancel and a service stop work on it, and the spare never touches CUDA.

Everything is real: the service on loopback, the spare and worker processes, their signals and /proc.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from procs import running

from service.api import convert
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.app import Service, start_service
from service.jobs.launcher import worker_env
from service.jobs.local_launcher import LocalProcessLauncher
from service.jobs.spare_worker import SPARE_FLAG, Assignment
from service.jobs.store import JobStore
from service.settings import Settings
from tests.integration.harness import (
    FINAL,
    channel_to,
    make_image_folder,
    make_settings,
    spec,
    stub,
    wait_event,
    wait_for,
    wait_state,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TIMINGS = re.compile(r"\[worker (\d+)\] worker timings (\{.*\})")


def connections_to(pid: int, port: int) -> set[int]:
    """The process's established TCP connections to `port` (by local port)."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def local_launcher(service: Service) -> LocalProcessLauncher:
    single = service.scheduler.launcher.single  # type: ignore[attr-defined]  # ByWorldSize
    assert isinstance(single, LocalProcessLauncher)
    return single


def spare_of(service: Service) -> int:
    return wait_for(lambda: local_launcher(service).spare_pid(), 30, "a spare worker")


def worker_timings(settings: Settings, job_id: str) -> tuple[int, dict[str, float]]:
    """The pid of the job's worker and its timings, from the line it writes to the job's worker.log."""
    match = TIMINGS.search((settings.job_dir(job_id) / "worker.log").read_text())
    assert match, f"no timings line in the worker.log of {job_id}"
    return int(match.group(1)), json.loads(match.group(2))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    make_image_folder(tmp_path / "data" / "ds", per_class=4)
    return make_settings(tmp_path)


@pytest.fixture
def service(settings: Settings) -> Iterator[Service]:
    service = start_service(settings)
    try:
        yield service
    finally:
        service.stop(drain=False)


@pytest.mark.slow
def test_a_job_runs_on_the_spare_started_before_it_and_the_next_job_on_a_fresh_one(
    service: Service, settings: Settings
) -> None:
    first_spare = spare_of(service)
    # connected to the reporting API before its job exists (ReadyChannel), and it keeps that connection
    early = wait_for(lambda: connections_to(first_spare, service.reporting.port), 120, "the early connection")
    with channel_to(service) as channel:
        client = stub(channel)
        submitted = time.time()
        first = client.CreateJob(pb.CreateJobRequest(spec=spec("first")))
        assert wait_state(client, first.id, FINAL, timeout=240).state == pb.SUCCEEDED
        pid, timings = worker_timings(settings, first.id)
        assert pid == first_spare
        assert timings["warm"] is True
        assert timings["preconnected"] == 1.0  # its reporter took the channel connected ahead
        assert len(early) == 1
        # the same process, not a reused pid: it started before the job existed and took it after
        assert timings["process_started_at"] < submitted < timings["assigned_at"]

        second_spare = spare_of(service)
        assert second_spare != first_spare
        second = client.CreateJob(pb.CreateJobRequest(spec=spec("second")))
        assert wait_state(client, second.id, FINAL, timeout=240).state == pb.SUCCEEDED
        assert worker_timings(settings, second.id)[0] == second_spare
    assert not running(first_spare) and not running(second_spare)  # released: their groups are gone


@pytest.mark.slow
def test_a_cancelled_job_on_the_spare_stops_at_a_safe_point(service: Service, settings: Settings) -> None:
    spare = spare_of(service)
    with channel_to(service) as channel:
        client = stub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("long", training={"epochs": 50})))
        wait_event(client, job.id, "PROGRESS", timeout=240)  # training on the spare, mid-epoch
        assert service.store.worker_ref(job.id) == str(spare)
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
        done = wait_state(client, job.id, FINAL, timeout=120)
    assert done.state == pb.CANCELLED
    assert worker_timings(settings, job.id)[0] == spare
    wait_for(lambda: not running(spare) or None, 30, "the cancelled worker to be gone")


def test_stopping_the_service_ends_its_idle_spare(settings: Settings) -> None:
    service = start_service(settings)
    try:
        spare = spare_of(service)
        assert running(spare)
    finally:
        service.stop(drain=False)
    assert not running(spare)
    assert local_launcher(service).spare_pid() is None


@pytest.mark.slow
def test_with_warm_workers_off_there_is_no_spare_and_a_job_runs_on_a_worker_of_its_own(
    tmp_path: Path,
) -> None:
    make_image_folder(tmp_path / "data" / "ds", per_class=4)
    settings = make_settings(tmp_path, warm_workers=0)
    service = start_service(settings)
    try:
        assert local_launcher(service).spare_pid() is None
        with channel_to(service) as channel:
            client = stub(channel)
            submitted = time.time()
            job = client.CreateJob(pb.CreateJobRequest(spec=spec("cold")))
            assert wait_state(client, job.id, FINAL, timeout=240).state == pb.SUCCEEDED
        _, timings = worker_timings(settings, job.id)
        assert timings["warm"] is False
        assert submitted < timings["process_started_at"] < timings["imports_done_at"]
    finally:
        service.stop(drain=False)


def service_process(
    settings: Settings, log: Path | None = None, **env_overrides: str
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env |= {
        "TUNESERVE_STATE_DIR": str(settings.state_dir),
        "TUNESERVE_DATA_ROOT": str(settings.data_root),
        "TUNESERVE_TORCH_HOME": str(settings.torch_home),
        "TUNESERVE_PORT": "0",
        "TUNESERVE_TORCHSERVE_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
        **env_overrides,
    }
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(
        [sys.executable, "-c", "from service.app import run_service; run_service()"],
        cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip


def spare_children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and SPARE_FLAG.encode() in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_spare_dies_with_the_service_process(settings: Settings, how: signal.Signals) -> None:
    process = service_process(settings)
    try:
        [spare] = wait_for(lambda: spare_children(process.pid) or None, 60, "the service's spare")
        process.send_signal(how)
        process.wait(timeout=60)
        wait_for(lambda: not running(spare) or None, 30, "the spare to end")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


CUDA_PROBE = """
import sys, torch
touched = []
def record(name):
    def call(*args, **kwargs):
        touched.append(name)
        raise RuntimeError(f"the spare called torch.cuda: {name}")
    return call
for name in ("_lazy_init", "init", "device_count", "is_available", "current_device", "set_device"):
    setattr(torch.cuda, name, record(name))
torch._C._cuda_getDeviceCount = record("_cuda_getDeviceCount")
from service import worker_app
code = worker_app.main(["--spare"])  # stdin is empty: it prepares, finds no job and returns
print("touched", touched, "code", code)
sys.exit(1 if touched else code)
"""


def test_the_spare_never_calls_into_torch_cuda_before_its_job(tmp_path: Path) -> None:
    """CUDA_VISIBLE_DEVICES is read when CUDA initialises: the spare must leave that to its job."""
    result = subprocess.run(
        [sys.executable, "-c", CUDA_PROBE],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "touched [] code 0" in result.stdout
    assert "spare worker ready" in result.stderr


def test_a_spare_started_with_another_environment_is_not_used(tmp_path: Path) -> None:
    """The spare imported torch under its environment: a job with another one starts cold."""
    settings = make_settings(tmp_path)
    launcher = LocalProcessLauncher(settings)
    try:
        spare = wait_for(launcher.spare_pid, 10, "a spare")
        other = {"OMP_NUM_THREADS": "7", "PATH": os.environ.get("PATH", "")}
        log_path = tmp_path / "worker.log"
        assert launcher._from_spare(Assignment("job-x", str(log_path), other)) is None  # cold
        assert not running(spare) or wait_for(lambda: not running(spare) or None, 10, "the unfit spare")
        assert launcher.spare_pid() not in (None, spare)  # the next spare, with the job's environment
    finally:
        launcher.close()


def test_a_spare_that_died_before_its_job_means_a_cold_start_and_a_new_spare(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    launcher = LocalProcessLauncher(settings)
    try:
        spare = wait_for(launcher.spare_pid, 10, "a spare")
        os.killpg(spare, signal.SIGKILL)
        wait_for(lambda: not running(spare) or None, 10, "the spare to die")
        env = worker_env(settings)
        assert launcher._from_spare(Assignment("job-x", str(tmp_path / "worker.log"), env)) is None  # cold
        assert launcher.spare_pid() not in (None, spare)
    finally:
        launcher.close()


@pytest.mark.slow
def test_a_restarted_service_stops_the_warm_started_worker_its_predecessor_left(settings: Settings) -> None:
    """A spare's command line says --spare, not --job-id: the restarted service knows it by its worker.log.
    The worker would stop by itself once it lost the service for report_lost_s: that is long here, so only
    the restarted service can have ended it."""
    patient = {"TUNESERVE_REPORT_LOST_S": "600", "TUNESERVE_CANCEL_GRACE_S": "5"}
    first = service_process(settings, settings.state_dir.parent / "first.log", **patient)
    second = None
    worker = 0
    try:
        [spare] = wait_for(lambda: spare_children(first.pid) or None, 60, "the first service's spare")
        store = JobStore(settings.jobs_db)
        try:
            job = store.create_job(convert.spec_from_proto(spec("orphan", training={"epochs": 500})))
            wait_for(lambda: store.worker_ref(job.id), 120, "the job's worker")
            assert store.worker_ref(job.id) == str(spare)
        finally:
            store.close()
        worker = spare
        wait_for(lambda: (settings.job_dir(job.id) / "worker.log").read_text().count("worker timings"), 120)
        first.kill()  # SIGKILL: the worker, its job in hand, outlives the service
        first.wait(timeout=30)
        time.sleep(1.0)
        assert running(worker)

        log = settings.state_dir.parent / "second.log"
        second = service_process(settings, log, **patient)
        wait_for(lambda: not running(worker) or None, 120, "the orphaned worker to be stopped")
        assert f"stopping worker {worker} of job {job.id} left by the previous service" in log.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        if worker and running(worker):
            os.killpg(worker, signal.SIGKILL)
