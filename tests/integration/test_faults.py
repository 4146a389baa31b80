"""Faults, caused for real: the service killed with SIGKILL mid-epoch, mid-checkpoint-write and
mid-packaging; workers killed, and OOM-killed by the kernel; SIGTERM; TorchServe's JVM killed;
checkpoint writers killed at random moments; a full disk.

The service runs as a real process (`run_service`, as `tuneserve serve` does) on loopback, in a tmp
state folder, one torch thread everywhere. A job that survived a fault is compared with an
uninterrupted reference run of the same spec and seed: the whole metric history (but wall times) and
every weight must be equal.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import checkpoint_writer
import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import make_image_folder, spec, wait_for
from procs import running
from reliability import record

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.api.server import INFERENCE
from service.jobs.store import JobStore
from service.packaging.mar_files import sha256_of
from service.records import EventKind, Job, JobState
from service.training.checkpoints import load_checkpoint
from tests.ports import free_ports

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVING_ON = re.compile(r"tuneserve is serving on [\d.]+:(\d+)")
EPOCHS = 3
PER_CLASS = 16  # 24 training images, 6 steps an epoch: long enough to be caught mid-epoch
WORKER = b"service.worker_app"


def fault_spec(name: str, training: dict[str, Any] | None = None, **sections: Any) -> pb.JobSpec:
    return spec(name, training={"epochs": EPOCHS, "seed": 7, **(training or {})}, **sections)


# --------------------------------------------------------------------------------------- processes


@dataclass
class ServiceProcess:
    """`run_service()` in its own process, on a state folder that outlives it (restarts reuse it)."""

    root: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
        env |= {
            "TUNESERVE_STATE_DIR": str(self.state_dir),
            "TUNESERVE_DATA_ROOT": str(self.root / "data"),
            "TUNESERVE_TORCH_HOME": str(self.root / "torch"),
            "TUNESERVE_PORT": "0",
            "TUNESERVE_TORCHSERVE_ENABLED": "false",
            "TUNESERVE_MAX_CONCURRENT_JOBS": "1",
            "TUNESERVE_CANCEL_GRACE_S": "5",
            "TUNESERVE_DRAIN_GRACE_S": "60",
            "OMP_NUM_THREADS": "1",  # the same arithmetic in every run, and kind to a shared CPU
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        return env | self.env_overrides

    def launch(self) -> Path:
        """Start the process and return its log, without waiting for it to serve."""
        self.starts += 1
        log = self.log_path(self.starts)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from service.app import run_service; run_service()"],
                cwd=PROJECT_ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return log

    def start(self, timeout: float = 240) -> int:
        log = self.launch()

        def serving() -> int | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited at start: {log.read_text()[-3000:]}")
            match = SERVING_ON.search(log.read_text())
            return int(match.group(1)) if match else None

        self.port = wait_for(serving, timeout, "the service to start")
        return self.port

    def log_path(self, start: int) -> Path:
        return self.root / f"service-{start}.log"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no handler, no drain, no clean-up
        self.process.wait()

    @contextlib.contextmanager
    def client(self) -> Iterator[pb_grpc.FineTuningStub]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            yield pb_grpc.FineTuningStub(channel)

    def store(self) -> JobStore:
        return JobStore(self.state_dir / "jobs.sqlite3")

    def cleanup(self) -> None:
        """Leave nothing running on a shared machine: the service, its workers, its TorchServe."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
        db = self.state_dir / "jobs.sqlite3"
        if db.exists():
            store = JobStore(db)
            try:
                jobs, _ = store.list_jobs(page_size=100)
                for job in jobs:
                    pid = store.worker_pid(job.id)
                    if pid is not None and is_worker(pid):
                        kill_group(pid)
            finally:
                store.close()
        java = torchserve_pid(self.state_dir)
        if java is not None:
            with contextlib.suppress(OSError):
                kill_group(os.getpgid(java))


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    made: list[ServiceProcess] = []
    yield made
    for service in made:
        service.cleanup()


def new_service(services: list[ServiceProcess], root: Path, **env: str) -> ServiceProcess:
    make_image_folder(root / "data" / "ds", per_class=PER_CLASS)
    service = ServiceProcess(root, env)
    services.append(service)
    return service


def new_torchserve_service(services: list[ServiceProcess], root: Path) -> ServiceProcess:
    """A service with TorchServe on five free ports and a small JVM heap."""
    names = ("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_INFERENCE", "GRPC_MANAGEMENT")
    ports = {f"TUNESERVE_TORCHSERVE_{n}_PORT": str(p) for n, p in zip(names, free_ports(5), strict=True)}
    return new_service(
        services, root, TUNESERVE_TORCHSERVE_ENABLED="true", TUNESERVE_TORCHSERVE_JAVA_HEAP="256m", **ports
    )


def is_worker(pid: int) -> bool:
    try:
        return WORKER in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def torchserve_pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "torchserve" / "tmp" / ".model_server.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if running(pid) else None


# ------------------------------------------------------------------------------------ job helpers


def events(store: JobStore, job_id: str, kind: EventKind) -> list[Any]:
    return [e for e in store.events_after(job_id) if e.kind == kind]


def wait_checkpoint(store: JobStore, job_id: str, epoch: int, timeout: float = 240) -> None:
    wait_for(
        lambda: any(e.data["epoch"] == epoch for e in events(store, job_id, EventKind.CHECKPOINT)),
        timeout,
        f"the checkpoint of epoch {epoch} of {job_id}",
    )


def wait_final(store: JobStore, job_id: str, timeout: float = 300) -> Job:
    return wait_for(
        lambda: (job := store.get_job(job_id)).state.is_final and job, timeout, f"{job_id} to finish"
    )


def checkpoints_of(service: ServiceProcess, job_id: str) -> Path:
    return service.state_dir / "jobs" / job_id / "checkpoints"


def comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


@dataclass(frozen=True)
class Reference:
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    model: dict[str, torch.Tensor]
    last_size: int


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """The fault specs run without any fault, once for the module."""
    made: list[ServiceProcess] = []
    service = new_service(made, tmp_path_factory.mktemp("reference"))
    try:
        service.start()
        with service.client() as client:
            job = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("reference")))
        store = service.store()
        done = wait_final(store, job.id)
        store.close()
        assert done.state == JobState.SUCCEEDED, done.error
        last = checkpoints_of(service, job.id) / "last.pt"
        state = load_checkpoint(last)
        yield Reference(
            comparable(state["history"]),
            without_time(done.result.metrics),
            state["model"],
            last.stat().st_size,
        )
    finally:
        for s in made:
            s.cleanup()


def without_time(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "epoch_time_s"}


def assert_like_reference(service: ServiceProcess, job: Job, reference: Reference) -> None:
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.result.epochs_completed == EPOCHS
    state = load_checkpoint(checkpoints_of(service, job.id) / "last.pt")
    assert comparable(state["history"]) == reference.history
    assert without_time(job.result.metrics) == reference.metrics
    for name, tensor in reference.model.items():
        assert torch.equal(state["model"][name], tensor), name


# ------------------------------------------------------------------------- kill -9 of the service


@pytest.mark.slow
def test_service_killed_mid_epoch_finishes_every_job_like_an_uninterrupted_run(
    services: list[ServiceProcess], tmp_path: Path, reference: Reference
) -> None:
    # heartbeats every 0.1 s, and the first that fails means the service is gone (lost after 0 s)
    service = new_service(services, tmp_path, TUNESERVE_REPORT_HEARTBEAT_S="0.1", TUNESERVE_REPORT_LOST_S="0")
    service.start()
    with service.client() as client:
        busy = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("running")))
        queued = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("queued")))
    store = service.store()
    # The worker is held still from the moment its first checkpoint is recorded until the service is dead,
    # so the kill lands in epoch 2 however loaded the machine is: looking every 0.1 s and killing while it
    # ran once let a loaded reliability run see epoch 2 checkpointed first.
    deadline = time.monotonic() + 240
    while not any(e.data["epoch"] == 1 for e in events(store, busy.id, EventKind.CHECKPOINT)):
        assert time.monotonic() < deadline, f"the checkpoint of epoch 1 of {busy.id} within 240 s"
        time.sleep(0.005)
    worker = store.worker_pid(busy.id)
    assert worker is not None
    os.kill(worker, signal.SIGSTOP)
    try:
        assert [e.data["epoch"] for e in events(store, busy.id, EventKind.EPOCH)] == [1]
        service.kill()
    finally:
        os.kill(worker, signal.SIGCONT)
    # The orphaned worker's next heartbeat fails and it stops at its next batch, mid-epoch 2: nothing of
    # epoch 2 is recorded and last.pt still holds epoch 1. Its last words reach only its log: the
    # service that would record them is gone.
    wait_for(lambda: not running(worker), 60, "the orphaned worker to stop")
    worker_log = (service.state_dir / "jobs" / busy.id / "worker.log").read_text()
    assert "training stopped (draining); the last checkpoint is kept" in worker_log
    assert [e.data["epoch"] for e in events(store, busy.id, EventKind.EPOCH)] == [1]
    assert load_checkpoint(checkpoints_of(service, busy.id) / "last.pt")["epoch"] == 1
    assert store.get_job(queued.id).state == JobState.QUEUED

    service.start()
    finished = [wait_final(store, job.id) for job in (busy, queued)]
    with service.client() as client:
        listed = [j.id for j in client.ListJobs(pb.ListJobsRequest()).jobs]
    assert sorted(listed) == sorted([busy.id, queued.id])  # none lost, none duplicated
    for job in finished:
        assert_like_reference(service, job, reference)
    assert [e.data["epoch"] for e in events(store, busy.id, EventKind.EPOCH)] == [1, 2, 3]
    assert any(e.message.startswith("resumed from") for e in events(store, busy.id, EventKind.INFO))
    store.close()
    record(
        "fault", "kill -9 of the service mid-epoch (2 jobs: running, queued)", 1,
        "orphaned worker stopped at its next batch (its heartbeat failed); after restart both jobs "
        "SUCCEEDED, metrics and weights equal to an uninterrupted run",
    )  # fmt: skip


@pytest.mark.slow
def test_service_and_worker_killed_mid_checkpoint_write_resume_from_the_previous_checkpoint(
    services: list[ServiceProcess], tmp_path: Path, reference: Reference
) -> None:
    service = new_service(services, tmp_path)
    service.start()
    with service.client() as client:
        job = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("cut")))
    store = service.store()
    folder = checkpoints_of(service, job.id)
    wait_checkpoint(store, job.id, 1)
    worker = store.worker_pid(job.id)
    assert worker is not None

    # a tight poll (wait_for sleeps 0.1 s between looks): epoch 2's last.pt under its temporary name
    deadline = time.monotonic() + 120
    while not any(n.startswith(".last.pt.") and n.endswith(".tmp") for n in os.listdir(folder)):
        assert time.monotonic() < deadline, "epoch 2's checkpoint write did not begin within 120 s"
        time.sleep(0.001)
    # the whole tree at once, as when a container is killed: the writer dies mid-write
    kill_group(worker)
    service.kill()
    partial = list(folder.glob(".last.pt.*.tmp"))
    assert partial, "the write finished before the kill landed"
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    assert load_checkpoint(folder / "best.pt")["epoch"] == 1

    service.start()
    done = wait_final(store, job.id)
    assert_like_reference(service, done, reference)
    assert not list(folder.glob(".*.tmp"))  # the cut write was discarded on resume
    store.close()
    record(
        "fault", "kill -9 of the service and its worker during a checkpoint write", 1,
        "last.pt/best.pt stayed at the previous epoch; the partial file was discarded on restart; "
        "the job resumed and ended equal to an uninterrupted run",
    )  # fmt: skip


@pytest.mark.slow
def test_service_killed_while_packaging_ends_with_exactly_one_archive(
    services: list[ServiceProcess], tmp_path: Path, reference: Reference
) -> None:
    service = new_service(services, tmp_path)
    service.start()
    with service.client() as client:
        job = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("packed")))
    store = service.store()

    deadline = time.monotonic() + 300  # a tight poll: packaging takes a second or two
    while store.get_job(job.id).state != JobState.PACKAGING:
        assert time.monotonic() < deadline, "the job was not PACKAGING within 300 s"
        time.sleep(0.005)
    service.kill()
    assert store.get_job(job.id).state == JobState.PACKAGING

    service.start()
    done = wait_final(store, job.id)
    assert_like_reference(service, done, reference)
    archives = sorted((service.state_dir / "model_store").glob("*.mar"))
    assert [a.name for a in archives] == ["packed-v1.mar"]
    assert done.result.archive_path == str(archives[0])
    assert sha256_of(archives[0]) == done.result.archive_sha256
    assert len(events(store, job.id, EventKind.PACKAGED)) == 1
    store.close()
    record(
        "fault", "kill -9 of the service while a job was PACKAGING", 1,
        "after restart the job SUCCEEDED with exactly one archive whose SHA-256 matches; metrics equal",
    )  # fmt: skip


# ---------------------------------------------------------------------------------- dying workers


@pytest.mark.slow
def test_a_worker_killed_after_a_checkpoint_is_retried_from_it_and_ends_like_an_uninterrupted_run(
    services: list[ServiceProcess], tmp_path: Path, reference: Reference
) -> None:
    service = new_service(services, tmp_path, TUNESERVE_MAX_JOB_RETRIES="1")
    service.start()
    with service.client() as client:
        job = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("retried")))
    store = service.store()
    wait_checkpoint(store, job.id, 1)
    worker = store.worker_pid(job.id)
    assert worker is not None
    kill_group(worker)
    done = wait_final(store, job.id)
    assert_like_reference(service, done, reference)
    assert done.attempts == 2
    warnings = [e.message for e in events(store, job.id, EventKind.WARNING)]
    assert any("worker killed by SIGKILL" in w and "attempt 2 of 2" in w for w in warnings)
    resumed = [e for e in events(store, job.id, EventKind.INFO) if e.message.startswith("resumed from")]
    assert [e.data["epoch"] for e in resumed] == [1]
    store.close()
    record(
        "fault", "SIGKILL of a worker after its first checkpoint", 1,
        "retried (attempt 2 of 2), resumed after epoch 1, ended equal to an uninterrupted run",
    )  # fmt: skip


MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
OOM_LIMIT = 1200 * 1024 * 1024  # a worker training at 32 px peaks near 800 MB; at 512 px it needs ~2 GB


@contextlib.contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[Path]:
    """A cgroup-v1 memory cgroup with a hard limit: what a container's memory limit is."""
    group = MEMORY_CGROUPS / name
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here ({exc})")
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 30, "the cgroup to empty")
        group.rmdir()


def oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    raise AssertionError("memory.oom_control has no oom_kill count")


@pytest.mark.slow
@pytest.mark.skipif(not MEMORY_CGROUPS.is_dir(), reason="needs cgroup-v1 memory controller")
def test_a_worker_killed_by_the_oom_killer_is_retried_then_fails_and_the_service_lives_on(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    retries = 1
    service = new_service(services, tmp_path, TUNESERVE_MAX_JOB_RETRIES=str(retries))
    service.start()
    with memory_cgroup(f"tuneserve-faults-{os.getpid()}", OOM_LIMIT) as group:
        with service.client() as client:
            big = fault_spec("hungry", training={"epochs": 1, "image_size": 512, "batch_size": 16})
            job = client.CreateJob(pb.CreateJobRequest(spec=big))
        store = service.store()
        moved: list[int] = []

        def confine_each_attempt() -> bool:
            # each attempt's worker goes into the cgroup as soon as it exists, long before it
            # imports torch, so all it allocates counts against the limit
            pid = store.worker_pid(job.id)
            if pid is not None and pid not in moved and running(pid):
                with contextlib.suppress(OSError):  # it may not have been ours to move yet
                    (group / "cgroup.procs").write_text(str(pid))
                    moved.append(pid)
            if store.get_job(job.id).state.is_final:
                return True
            time.sleep(0.01)
            return False

        wait_for(confine_each_attempt, 300, "the hungry job to finish")
        failed = store.get_job(job.id)
        kills = oom_kills(group)
    assert failed.state == JobState.FAILED
    assert failed.error == "worker killed by SIGKILL (exit -9) (out of memory?), 2 attempts"
    assert len(moved) == 1 + retries and kills == 1 + retries  # every attempt, by the kernel's OOM killer
    warnings = [e.message for e in events(store, job.id, EventKind.WARNING)]
    assert any("retrying from the last checkpoint (attempt 2 of 2)" in w for w in warnings)
    with service.client() as client:  # the service lives on: the next job trains and succeeds
        after = client.CreateJob(pb.CreateJobRequest(spec=spec("after")))
    assert wait_final(store, after.id).state == JobState.SUCCEEDED
    store.close()
    record(
        "fault", "worker OOM-killed by the kernel (memory cgroup limit, 512 px batch 16)", 1 + retries,
        f"retried up to max_job_retries={retries}, then FAILED: {failed.error}; the next job SUCCEEDED",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_drains_the_running_job_and_it_resumes_like_an_uninterrupted_run(
    services: list[ServiceProcess], tmp_path: Path, reference: Reference
) -> None:
    service = new_service(services, tmp_path)
    service.start()
    with service.client() as client:
        job = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("drained")))
    store = service.store()
    wait_checkpoint(store, job.id, 1)
    worker = store.worker_pid(job.id)
    assert worker is not None and service.process is not None
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=90) == 0
    drained_in = time.monotonic() - started
    assert drained_in < 60 + 5  # drain_grace_s + the API's grace
    assert not running(worker)
    assert store.get_job(job.id).state == JobState.QUEUED
    assert "received SIGTERM; draining" in service.log_path(1).read_text()

    service.start()
    done = wait_final(store, job.id)
    assert_like_reference(service, done, reference)
    assert done.attempts == 1  # a drained attempt is not counted against the retries
    store.close()
    record(
        "fault", "SIGTERM to the service mid-training", 1,
        f"drained in {drained_in:.1f} s (exit 0, job QUEUED); after restart it resumed and ended equal "
        "to an uninterrupted run",
    )  # fmt: skip


# ----------------------------------------------------------------------------- TorchServe killed


def health_of(channel: grpc.Channel, service: str) -> int:
    """The status of `service`; SERVICE_UNKNOWN for a name not published yet (the server's NOT_FOUND)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.mark.slow
@pytest.mark.torchserve
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_a_killed_torchserve_is_restarted_and_predict_is_unavailable_until_it_is_back(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    service = new_torchserve_service(services, tmp_path)
    service.start()
    image = next((tmp_path / "data" / "ds" / "class_0").glob("*.png")).read_bytes()
    request = pb.PredictRequest(model="faulty", images=[image], top_k=2)
    serving = {"enabled": True, "model_name": "faulty", "batch_size": 1, "max_batch_delay_ms": 10}
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        client, inference = pb_grpc.FineTuningStub(channel), pb_grpc.InferenceStub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("served", serving=serving)))
        store = service.store()
        done = wait_final(store, job.id, timeout=400)
        assert done.state == JobState.SUCCEEDED, done.error
        before = inference.Predict(request, timeout=60)
        assert health_of(channel, INFERENCE) == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: health_of(channel, "torchserve/faulty") == health_pb2.HealthCheckResponse.SERVING,
                 30, "the model's own health to be SERVING")  # fmt: skip
        java = torchserve_pid(service.state_dir)
        assert java is not None

        os.kill(java, signal.SIGKILL)
        unavailable = 0
        saw_not_serving = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if health_of(channel, INFERENCE) == health_pb2.HealthCheckResponse.SERVING:
                if saw_not_serving:
                    break
                time.sleep(0.1)  # not yet noticed (the watchdog looks every 2 s)
                continue
            saw_not_serving = True
            with pytest.raises(grpc.RpcError) as error:
                inference.Predict(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
            unavailable += 1
            time.sleep(0.5)
        assert saw_not_serving and unavailable >= 1
        assert health_of(channel, INFERENCE) == health_pb2.HealthCheckResponse.SERVING
        after = inference.Predict(request, timeout=60)
        assert after == before  # the same model, registered again
        restarted = torchserve_pid(service.state_dir)
        assert restarted is not None and restarted != java
        served = client.ListServedModels(pb.ListServedModelsRequest()).models
        assert [(m.name, m.ready) for m in served] == [("faulty", True)]
        assert health_of(channel, "") == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: health_of(channel, "torchserve/faulty") == health_pb2.HealthCheckResponse.SERVING,
                 30, "the model's own health to be SERVING again")  # fmt: skip
    store.close()
    record(
        "fault", "SIGKILL of TorchServe's JVM while a model is served", 1,
        f"Inference health NOT_SERVING and Predict UNAVAILABLE ({unavailable} calls) until TorchServe was "
        "restarted with the model registered again; then SERVING and the same predictions",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.torchserve
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_sigterm_while_torchserve_starts_stops_torchserve_too(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    service = new_torchserve_service(services, tmp_path)
    log = service.launch()
    java = wait_for(lambda: torchserve_pid(service.state_dir), 120, "TorchServe's JVM to start")
    assert "tuneserve is serving on" not in log.read_text()  # still starting up
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=120) == 0, log.read_text()[-3000:]
    wait_for(lambda: not running(java), 30, "TorchServe's JVM to stop")
    assert "received SIGTERM; draining" in log.read_text()
    record(
        "fault", "SIGTERM to the service while TorchServe is still starting", 1,
        "the service finished starting, drained, stopped TorchServe and exited 0; no JVM left behind",
    )  # fmt: skip


# ------------------------------------------------------------------------------------ checkpoints


KILLS = 30


def check_checkpoints(folder: Path) -> tuple[int, int | None]:
    """last.pt and best.pt load with weights_only=True and each holds one epoch's bytes throughout."""
    last = load_checkpoint(folder / "last.pt")
    raw = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert raw["epoch"] == last["epoch"]
    epoch = last["epoch"]
    assert torch.all(last["model"]["w"] == epoch) and torch.all(
        last["optimizer"]["state"][0]["exp_avg"] == epoch
    )
    assert [h["epoch"] for h in last["history"]] == list(range(1, epoch + 1))
    if not (folder / "best.pt").exists():
        return epoch, None
    best = load_checkpoint(folder / "best.pt")
    assert torch.all(best["model"]["w"] == best["epoch"])
    # best may lag last by the one epoch whose publish a kill cut; never more, never a worse epoch
    ranked = checkpoint_writer.keeper(folder).rank(last["history"])
    ranked_before = checkpoint_writer.keeper(folder).rank(last["history"][:-1])
    assert best["epoch"] in {ranked[0][0], ranked_before[0][0] if ranked_before else None}
    return epoch, best["epoch"]


@pytest.mark.slow
def test_checkpoint_writes_killed_at_random_moments_never_corrupt_last_or_best(tmp_path: Path) -> None:
    context = multiprocessing.get_context("forkserver")
    # the children fork from a server that has torch imported: a kill every ~0.3 s, not every 3 s
    context.set_forkserver_preload(["torch", "checkpoint_writer"])
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    rng = random.Random(8)
    cut_mid_write, epochs = 0, []
    for _ in range(KILLS):
        writer = context.Process(target=checkpoint_writer.write_for_ever, args=(str(folder),))
        writer.start()
        time.sleep(rng.uniform(0.05, 0.6))
        writer.kill()
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        cut_mid_write += any(p.name.endswith(".tmp") for p in folder.iterdir())
        if (folder / "last.pt").exists():
            epochs.append(check_checkpoints(folder)[0])
    assert epochs == sorted(epochs) and epochs[-1] > KILLS // 2  # progress, never a step back
    assert cut_mid_write >= KILLS // 4  # most kills land inside a write, not between them
    # a final start repairs best/top-k from last.pt's history exactly as a resumed job does
    writer = context.Process(target=checkpoint_writer.write_for_ever, args=(str(folder),))
    writer.start()
    wait_for(lambda: len(load_checkpoint(folder / "last.pt")["history"]) > epochs[-1] + 1, 60, "progress")
    writer.kill()
    writer.join()
    record(
        "fault", "SIGKILL of a process writing checkpoints, at random moments", KILLS,
        f"{cut_mid_write} kills cut a write mid-way; last.pt and best.pt always loaded with "
        "weights_only=True, each whole and of one epoch, best never behind by more than one epoch",
    )  # fmt: skip


@contextlib.contextmanager
def small_filesystem(folder: Path, size: int) -> Iterator[Path]:
    """A real tmpfs of `size` bytes at `folder` (needs root and mount rights; else the test skips)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_job_with_the_reason_and_keeps_the_previous_checkpoints(
    services: list[ServiceProcess], tmp_path: Path, reference: Reference
) -> None:
    service = new_service(services, tmp_path)
    # room for one checkpoint (last = best = epoch-0001 are one file) and a half: the second can't fit
    size = reference.last_size * 3 // 2
    with small_filesystem(service.state_dir / "jobs", size):
        service.start()
        with service.client() as client:
            job = client.CreateJob(pb.CreateJobRequest(spec=fault_spec("cramped")))
        store = service.store()
        done = wait_final(store, job.id)
        folder = checkpoints_of(service, job.id)
        assert done.state == JobState.FAILED
        assert done.error is not None and done.error.startswith("ResourceExhausted: no space left to write")
        assert "the previous checkpoints are intact" in done.error and "Free space" in done.error
        assert done.attempts == 1  # not retried: a full disk stays full
        assert load_checkpoint(folder / "last.pt")["epoch"] == 1
        assert load_checkpoint(folder / "best.pt")["epoch"] == 1
        assert not list(folder.glob(".*.tmp"))
        with service.client() as client:
            assert [j.id for j in client.ListJobs(pb.ListJobsRequest()).jobs] == [job.id]
        store.close()
        service.kill()
    record(
        "fault", f"full disk (a {size // 2**20} MiB tmpfs under the job folders) at the second checkpoint", 1,
        "job FAILED with 'ResourceExhausted: no space left to write checkpoint ... (No space left on "
        "device); the previous checkpoints are intact'; last.pt/best.pt of epoch 1 intact, no partial file",
    )  # fmt: skip
