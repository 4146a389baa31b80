"""Two service replicas (real processes, one shared state folder) on one real PostgreSQL (tests/pg.py):
every job runs exactly once, and when one replica is killed with SIGKILL mid-training, the other takes
its job once the lease has run out and resumes it from the checkpoint the dead replica's worker left.
With TorchServe on in both (each its own), a job's version is gated by the replica that ran it and then
predicted through either; unserved through either, it is served by neither."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from harness import make_image_folder, spec, wait_for
from procs import running

from handlers.inference import ImageClassifier
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.jobs.store import JobStore
from service.records import EventKind, Job, JobState
from tests.ports import torchserve_ports

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVING_ON = re.compile(r"tuneserve is serving on [\d.]+:(\d+)")
LEASE_S = 6.0


@dataclass
class Replica:
    """`run_service()` in its own process, replica `name`, on the shared state folder under `root`."""

    name: str
    root: Path
    database_url: str
    torchserve: bool = False  # its own TorchServe (files and ports), over the shared served registry
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, timeout: float = 240) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
        env |= {
            "TUNESERVE_STATE_DIR": str(self.root / "state"),
            "TUNESERVE_DATA_ROOT": str(self.root / "data"),
            "TUNESERVE_TORCH_HOME": str(self.root / "torch"),
            "TUNESERVE_DATABASE_URL": self.database_url,
            "TUNESERVE_REPLICA_ID": self.name,
            "TUNESERVE_LEASE_S": str(LEASE_S),
            # a worker whose replica is gone stops at its first failed heartbeat: well within a lease
            "TUNESERVE_REPORT_HEARTBEAT_S": "0.2",
            "TUNESERVE_REPORT_LOST_S": "0",
            "TUNESERVE_PORT": "0",
            "TUNESERVE_TORCHSERVE_ENABLED": str(self.torchserve).lower(),
            "TUNESERVE_MAX_CONCURRENT_JOBS": "1",
            "TUNESERVE_CANCEL_GRACE_S": "5",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        if self.torchserve:
            env |= {name.upper().replace("TORCHSERVE_", "TUNESERVE_TORCHSERVE_", 1): str(port)
                    for name, port in torchserve_ports().items()}  # fmt: skip
            env |= {
                "TUNESERVE_TORCHSERVE_FILES_DIR": str(self.root / f"torchserve-{self.name}"),
                "TUNESERVE_SERVED_SYNC_S": "0.5",
                "TUNESERVE_TORCHSERVE_JAVA_HEAP": "256m",
            }
        log = self.root / f"replica-{self.name}.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from service.app import run_service; run_service()"],
                cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def serving() -> int | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"replica {self.name} exited at start: {log.read_text()[-3000:]}")
            match = SERVING_ON.search(log.read_text())
            return int(match.group(1)) if match else None

        self.port = wait_for(serving, timeout, f"replica {self.name} to start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no drain, no clean-up, its leases simply stop being renewed
        self.process.wait()

    @contextlib.contextmanager
    def client(self) -> Iterator[pb_grpc.FineTuningStub]:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            yield pb_grpc.FineTuningStub(channel)


@pytest.fixture
def replicas(tmp_path: Path, postgres_database: str) -> Iterator[tuple[Replica, Replica, JobStore]]:
    make_image_folder(tmp_path / "data" / "ds", per_class=8)
    pair = (Replica("a", tmp_path, postgres_database), Replica("b", tmp_path, postgres_database))
    store = JobStore(postgres_database)
    try:
        for replica in pair:
            replica.start()
        yield pair[0], pair[1], store
    finally:
        for replica in pair:
            if replica.process is not None and replica.process.poll() is None:
                replica.kill()
        jobs, _ = store.list_jobs(page_size=100)
        for job in jobs:  # leave no worker behind on a shared machine
            pid = store.worker_pid(job.id)
            if pid is not None and running(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        store.close()


def claims(store: JobStore, job_id: str) -> list[str]:
    """The replicas that claimed the job, in order (from its QUEUED -> RUNNING events)."""
    found = []
    for event in store.events_after(job_id):
        if event.kind == EventKind.STATE and event.data["state"] == "RUNNING":
            found.append(event.message.rsplit("claimed by ", 1)[-1])
    return found


def wait_final(store: JobStore, job_id: str, timeout: float = 300) -> Job:
    return wait_for(
        lambda: (job := store.get_job(job_id)).state.is_final and job, timeout, f"{job_id} to finish"
    )


def test_two_replicas_run_every_job_exactly_once(replicas: tuple[Replica, Replica, JobStore]) -> None:
    a, b, store = replicas
    with a.client() as client_a, b.client() as client_b:
        ids = [
            (client_a if i % 2 else client_b)
            .CreateJob(pb.CreateJobRequest(spec=spec(f"job-{i}", training={"epochs": 2})))
            .id
            for i in range(4)
        ]
    done = [wait_final(store, job_id) for job_id in ids]
    assert [job.state for job in done] == [JobState.SUCCEEDED] * 4, [job.error for job in done]
    assert [job.attempts for job in done] == [1] * 4
    owners = [claims(store, job_id) for job_id in ids]
    assert all(len(o) == 1 for o in owners), owners  # each claimed once: no job ran twice
    assert {o[0] for o in owners} == {"a", "b"}  # both replicas worked
    for job_id in ids:
        epochs = [e.data["epoch"] for e in store.events_after(job_id) if e.kind == EventKind.EPOCH]
        assert epochs == [1, 2]


def test_a_killed_replicas_job_is_resumed_by_the_other_from_its_checkpoint(
    replicas: tuple[Replica, Replica, JobStore],
) -> None:
    a, b, store = replicas
    with a.client() as client:
        job_id = client.CreateJob(pb.CreateJobRequest(spec=spec("survivor", training={"epochs": 4}))).id
    wait_for(
        lambda: any(e.kind == EventKind.CHECKPOINT for e in store.events_after(job_id)),
        240,
        "the first checkpoint",
    )
    [owner_name] = claims(store, job_id)
    owner, other = (a, b) if owner_name == "a" else (b, a)
    worker = store.worker_pid(job_id)
    assert worker is not None
    owner.kill()
    # the dead replica's worker stops at its first failed heartbeat, long before the lease runs out
    wait_for(lambda: not running(worker), 60, "the orphaned worker to stop")
    assert store.get_job(job_id).state == JobState.RUNNING  # still leased to the dead replica

    done = wait_final(store, job_id)
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.result.epochs_completed == 4
    assert done.attempts == 1  # the lost attempt was refunded: the replica died, not the job
    assert claims(store, job_id) == [owner.name, other.name]
    messages = [e.message for e in store.events_after(job_id)]
    assert any("lease expired" in m and f"({owner.name})" in m for m in messages)
    assert any(m.startswith("resumed from") for m in messages)


@pytest.fixture
def serving_replicas(tmp_path: Path, postgres_database: str) -> Iterator[tuple[Replica, Replica, JobStore]]:
    make_image_folder(tmp_path / "data" / "ds", per_class=8)
    pair = tuple(Replica(name, tmp_path, postgres_database, torchserve=True) for name in ("a", "b"))
    store = JobStore(postgres_database)
    try:
        for replica in pair:
            replica.start(timeout=400)  # its TorchServe first: two JVMs on a shared CPU
        yield pair[0], pair[1], store
    finally:
        for replica in pair:  # SIGTERM: each stops its TorchServe and workers
            if replica.process is not None and replica.process.poll() is None:
                replica.process.terminate()
                try:
                    replica.process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    replica.kill()
        store.close()


def test_a_version_gated_by_the_replica_that_trained_it_is_predicted_through_both(
    serving_replicas: tuple[Replica, Replica, JobStore], serving_images: list[bytes]
) -> None:
    a, b, store = serving_replicas
    served = {"enabled": True, "model_name": "pets", "top_k": 2}
    with a.client() as client:
        job_id = client.CreateJob(pb.CreateJobRequest(spec=spec("served", serving=served))).id
    done = wait_final(store, job_id)
    assert done.state == JobState.SUCCEEDED, done.error
    job = wait_for(
        lambda: (j := store.get_job(job_id)).result.served_version and j, 300, "the version served"
    )
    assert (job.result.served_model, job.result.served_version) == ("pets", "1")
    [trainer] = claims(store, job_id)
    messages = [e.message for e in store.events_after(job_id)]
    assert any(
        m.startswith("promotion gate: version 1 of pets answers like its checkpoint") for m in messages
    )

    classifier = ImageClassifier.from_checkpoint(torch.load(job.result.best_checkpoint, weights_only=True))
    expected = [[s["label"] for s in classifier.handle([{"data": i, "top_k": 2}])[0]] for i in serving_images]
    request = pb.PredictRequest(model="pets", images=serving_images)
    for replica in (a, b):  # the other replica's TorchServe loads the version at its next sync
        answer = wait_for(partial(_predicted, replica, request), 300, f"a prediction from {replica.name}")
        assert [[s.label for s in p.scores] for p in answer.predictions] == expected, replica.name

    other = b if trainer == "a" else a
    with other.client() as client:  # unserved through the replica that did not gate it
        client.UnserveModel(pb.UnserveModelRequest(name="pets"))
    trained_by = a if trainer == "a" else b
    with grpc.insecure_channel(f"127.0.0.1:{trained_by.port}") as channel:
        inference = pb_grpc.InferenceStub(channel)

        def unserved() -> bool:
            try:
                inference.Predict(request, timeout=60)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        wait_for(unserved, 60, f"replica {trained_by.name} to stop serving pets")
    # ... and its TorchServe, which gated the version, unregisters it at its next sync
    log = trained_by.root / f"replica-{trained_by.name}.log"
    wait_for(lambda: "pets: version 1 is no longer served" in log.read_text(), 60, "the unregister")


def _predicted(replica: Replica, request: pb.PredictRequest) -> pb.PredictResponse | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            return pb_grpc.InferenceStub(channel).Predict(request, timeout=60)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:  # not loaded here yet: anything else is a failure
            raise
        return None
