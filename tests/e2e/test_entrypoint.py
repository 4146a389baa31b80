"""The container's entrypoint, run on this host: docker/entrypoint.sh with the image's settings as far as
they apply here (the venv, TUNESERVE_* folders on tmp, free ports, an auth token, token-protected
TorchServe), a job through to a served prediction, then SIGTERM and a clean, prompt exit, and a job
interrupted by SIGTERM that resumes from its checkpoint when the entrypoint starts again.

Three starts on one state folder, as a container restarted on its volume:
  1. serve: job `served` trains, is packaged and served; Predict and TorchServe REST; SIGTERM while idle
  2. drain: the served model is back after the restart; job `resumable` gets SIGTERM mid-training
  3. resume: `resumable` resumes from its last checkpoint and finishes; SIGTERM again
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.jobs.store import JobStore
from service.records import EventKind, JobEvent, JobState
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
VENV = Path(sys.prefix)  # the venv running these tests: what the image's /opt/venv is to its entrypoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(600),
]

DRAIN_GRACE_S = 60.0  # TUNESERVE_DRAIN_GRACE_S; the image's compose and k8s use 240
# The runtime's grace period: the drain plus the margin test_container_files.py requires of compose and
# k8s for TorchServe's stop. A stop that takes longer would be SIGKILLed by Docker or the kubelet.
GRACE_PERIOD_S = DRAIN_GRACE_S + 30.0
START_TIMEOUT_S = 240.0  # the service's first start also unpacks TorchServe's frontend
JOB_TIMEOUT_S = 240.0
CLASSES = ("class_0", "class_1")
RESUMABLE_EPOCHS = 30  # enough that SIGTERM after the first checkpoint lands mid-training
TS_PORTS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")

T = TypeVar("T")


# ------------------------------------------------------------------------------------ data and jobs


def make_image_folder(folder: Path, per_class: int = 8, size: int = 32) -> None:
    """folder/class_<i>/<j>.png: a red class and a green class, with noise."""
    for c, colour in enumerate(((220, 40, 40), (40, 200, 40))):
        for j in range(per_class):
            noise = np.random.default_rng(c * 100 + j).normal(0, 25, (size, size, 3))
            path = folder / CLASSES[c] / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(noise + colour, 0, 255).astype(np.uint8)).save(path)


def job_spec(name: str, epochs: int, *, served: bool) -> pb.JobSpec:
    """A job that trains in seconds: mobilenet_v3_small from random weights at 32 px on the CPU."""
    spec = pb.JobSpec(name=name)
    spec.model.architecture, spec.model.weights = "mobilenet_v3_small", "none"
    spec.data.path, spec.data.val_fraction = "ds", 0.25
    training = spec.training
    training.epochs, training.batch_size, training.image_size = epochs, 4, 32
    training.augmentation, training.device = "none", "cpu"
    spec.early_stopping.enabled = False
    spec.logging.tensorboard, spec.logging.wandb.mode = False, "disabled"
    spec.serving.enabled = served
    if served:
        spec.serving.model_name, spec.serving.top_k = "e2e", 2
    return spec


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------ the entrypoint


@dataclass(frozen=True)
class Stopped:
    returncode: int | None  # None: still running GRACE_PERIOD_S after SIGTERM (then killed)
    seconds: float
    leftovers: list[str]  # processes of this deployment still alive after the exit
    log: str


@dataclass
class Deployment:
    """One state folder and one environment, as a container's volume and its env; started many times."""

    root: Path
    env: dict[str, str]
    ports: dict[str, int]
    token: str
    marker: str  # in the environment of every process the entrypoint starts, and of nothing else
    starts: int = field(default=0)

    @property
    def state_dir(self) -> Path:
        return Path(self.env["TUNESERVE_STATE_DIR"])

    def start(self) -> Running:
        self.starts += 1
        log_path = self.root / f"entrypoint-{self.starts}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(ENTRYPOINT)], cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return Running(self, process, log_path)

    def processes(self) -> list[psutil.Process]:
        """Every live process started for this deployment (the service, TorchServe, workers)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get("TUNESERVE_E2E_MARKER") == self.marker:
                    found.append(process)
            except (psutil.Error, OSError):  # gone, or not ours to read
                continue
        return found


@dataclass
class Running:
    deployment: Deployment
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.deployment.ports['grpc']}")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.deployment.token}"),)

    def wait_serving(self) -> None:
        """Until the health service says the server and Inference (TorchServe) are SERVING."""

        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the entrypoint exited with {self.process.returncode}:\n{self.log()}")
            with self.channel() as channel:
                health = health_pb2_grpc.HealthStub(channel)
                try:
                    return all(
                        health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                        for name in ("", "tuneserve.v1.Inference")
                    )
                except grpc.RpcError:
                    return False  # not listening yet

        wait_for(serving, START_TIMEOUT_S, "the service to be SERVING")

    def stop(self) -> Stopped:
        """SIGTERM, as `docker stop` and the kubelet send it, then wait up to the grace period."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = self.process.wait(GRACE_PERIOD_S)
        except subprocess.TimeoutExpired:
            returncode = None
        seconds = time.monotonic() - started
        # What the exit left behind; a moment first, so a process already exiting is not counted.
        leftovers = wait_gone(self.deployment, timeout=2.0)
        kill_all(self.deployment)
        return Stopped(returncode, seconds, [describe(p) for p in leftovers], self.log())


def wait_gone(deployment: Deployment, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := deployment.processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(deployment: Deployment) -> None:
    """SIGKILL this deployment's processes (only ever those this test started: they carry its marker)."""
    for process in deployment.processes():
        try:
            process.kill()
        except psutil.Error:
            continue


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return str(process.pid)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    assert (VENV / "bin" / "tuneserve").exists(), f"{VENV} has no tuneserve: run `make setup`"
    root = tmp_path_factory.mktemp("entrypoint")
    make_image_folder(root / "data" / "ds")
    grpc_port, *ts_ports = free_ports(1 + len(TS_PORTS))
    token, marker = secrets.token_hex(16), secrets.token_hex(8)
    # The developer's own settings must not leak in: the image starts from none but its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESERVE_", "TS_"))}
    env |= {
        "TUNESERVE_VENV": str(VENV),
        "TUNESERVE_STATE_DIR": str(root / "state"),  # the /state volume
        "TUNESERVE_DATA_ROOT": str(root / "data"),  # the /data volume
        "TORCH_HOME": str(root / "torch"),  # the image's /opt/torch (no weights needed: weights none)
        "TUNESERVE_PORT": str(grpc_port),
        "TUNESERVE_AUTH_TOKEN": token,
        "TUNESERVE_DRAIN_GRACE_S": str(DRAIN_GRACE_S),
        "TUNESERVE_E2E_MARKER": marker,
        # One torch thread per process: on this shared 2-core machine spinning OpenMP threads in the
        # training worker and TorchServe's worker slow both down many times over.
        "OMP_NUM_THREADS": "1",
    }
    ports = {"grpc": grpc_port, **dict(zip(TS_PORTS, ts_ports, strict=True))}
    env |= {f"TUNESERVE_TORCHSERVE_{name.upper()}_PORT": str(ports[name]) for name in TS_PORTS}
    deployment = Deployment(root, env, ports, token, marker)
    yield deployment
    kill_all(deployment)  # a failed phase may have left its service running


# ------------------------------------------------------------------------------------ talking to it


def create_job(running: Running, spec: pb.JobSpec) -> str:
    with running.channel() as channel:
        request = pb.CreateJobRequest(spec=spec)
        job: pb.Job = pb_grpc.FineTuningStub(channel).CreateJob(request, metadata=running.metadata())
        return job.id


def get_job(running: Running, job_id: str) -> pb.Job:
    with running.channel() as channel:
        request = pb.GetJobRequest(job_id=job_id)
        job: pb.Job = pb_grpc.FineTuningStub(channel).GetJob(request, metadata=running.metadata())
        return job


def wait_final(running: Running, job_id: str) -> pb.Job:
    final = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
    return wait_for(
        lambda: job if (job := get_job(running, job_id)).state in final else None,
        JOB_TIMEOUT_S,
        f"job {job_id} to finish",
    )


def events(running: Running, job_id: str) -> list[pb.JobEvent]:
    """The job's events so far (a watch that ends at a final state, or when its deadline cuts it)."""
    found = []
    with running.channel() as channel:
        stream = pb_grpc.FineTuningStub(channel).WatchJob(
            pb.WatchJobRequest(job_id=job_id), metadata=running.metadata(), timeout=2
        )
        try:
            found.extend(stream)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    return found


def predict(running: Running, model: str, version: str, image: bytes) -> list[tuple[str, float]]:
    """tuneserve's Inference.Predict: [(label, probability)], most likely first."""
    with running.channel() as channel:
        request = pb.PredictRequest(model=model, version=version, images=[image])
        reply = pb_grpc.InferenceStub(channel).Predict(request, metadata=running.metadata(), timeout=60)
    (prediction,) = reply.predictions
    assert not prediction.error, prediction.error
    return [(s.label, s.probability) for s in prediction.scores]


def rest_predict(running: Running, model: str, version: str, image: bytes, key: str | None) -> Any:
    """TorchServe's REST inference API itself, with (or without) the key TorchServe wrote."""
    url = f"http://127.0.0.1:{running.deployment.ports['inference']}/predictions/{model}/{version}"
    headers = {"Content-Type": "application/octet-stream"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=image, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code


def inference_key(deployment: Deployment) -> str:
    """The inference key from the key file TorchServe writes into its working folder (mode 0600)."""
    keys = json.loads((deployment.state_dir / "torchserve" / "key_file.json").read_text())
    return str(keys["inference"]["key"])


def image(deployment: Deployment, name: str = "class_0/0.png") -> bytes:
    return (deployment.root / "data" / "ds" / name).read_bytes()


def java_processes(deployment: Deployment) -> list[psutil.Process]:
    return [p for p in deployment.processes() if "java" in p.name()]


# ------------------------------------------------------------------------------------ 1. serve


@dataclass(frozen=True)
class Served:
    service_cmdline: list[str]  # of the entrypoint's pid, while it ran
    java_while_running: int
    healthcheck: subprocess.CompletedProcess[str]
    job: pb.Job
    via_api: list[tuple[str, float]]
    via_rest: Any
    rest_without_key: Any
    stopped: Stopped


@pytest.fixture(scope="module")
def served(deployment: Deployment) -> Served:
    running = deployment.start()
    try:
        running.wait_serving()
        cmdline = psutil.Process(running.process.pid).cmdline()
        # The image's HEALTHCHECK command, in the same environment.
        check = subprocess.run(
            [str(VENV / "bin" / "python"), str(ROOT / "scripts" / "healthcheck.py")],
            env=deployment.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        job_id = create_job(running, job_spec("served", 1, served=True))
        job = wait_final(running, job_id)
        assert job.state == pb.SUCCEEDED, f"{job.error}\n{running.log()[-3000:]}"
        model, version = job.result.served_model, job.result.served_version
        via_api = predict(running, model, version, image(deployment))
        via_rest = rest_predict(running, model, version, image(deployment), inference_key(deployment))
        without_key = rest_predict(running, model, version, image(deployment), None)
        java = len(java_processes(deployment))
    finally:
        stopped = running.stop()
    return Served(cmdline, java, check, job, via_api, via_rest, without_key, stopped)


def test_the_entrypoint_execs_into_the_service(served: Served) -> None:
    # The pid the runtime signals is `tuneserve serve` itself (Python), not a shell waiting on it.
    assert Path(served.service_cmdline[0]).name.startswith("python"), served.service_cmdline
    assert served.service_cmdline[1:3] == [str(VENV / "bin" / "tuneserve"), "serve"]
    assert "received SIGTERM; draining" in served.stopped.log


def test_the_image_healthcheck_passes_against_the_running_service(served: Served) -> None:
    assert served.healthcheck.returncode == 0, served.healthcheck.stderr


def test_a_job_is_trained_packaged_and_served(served: Served) -> None:
    result = served.job.result
    assert result.epochs_completed == 1
    assert Path(result.archive_path).is_file()
    assert (result.served_model, result.served_version) == ("e2e", "1")


def test_predict_and_torchserve_rest_give_the_same_answer(served: Served) -> None:
    labels = [label for label, _ in served.via_api]
    probabilities = [p for _, p in served.via_api]
    assert sorted(labels) == list(CLASSES)  # top_k 2 of 2 classes
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    rest = [(score["label"], score["probability"]) for score in served.via_rest]
    assert [label for label, _ in rest] == labels
    assert [p for _, p in rest] == pytest.approx(probabilities, abs=1e-5)


def test_torchserve_rest_refuses_a_request_without_its_key(served: Served) -> None:
    assert served.rest_without_key == 400  # TorchServe's InvalidKeyException: token auth is on


def test_sigterm_while_idle_exits_0_promptly_and_stops_torchserve(served: Served) -> None:
    stopped = served.stopped
    assert stopped.returncode == 0, stopped.log[-3000:]
    # Nothing was running, so nothing to drain: far below the drain deadline, let alone the grace period.
    assert stopped.seconds < DRAIN_GRACE_S / 2, f"{stopped.seconds:.1f} s"
    assert served.java_while_running == 1  # TorchServe's JVM was there, and the check below can see it
    assert stopped.leftovers == []
    assert "TorchServe stopped" in stopped.log


# ------------------------------------------------------------------------------------ 2. drain


@dataclass(frozen=True)
class Drained:
    served_again: list[tuple[str, float]]
    job_id: str
    first_checkpoint_epoch: int
    stopped: Stopped
    state_after: JobState  # in the jobs database the stopped service left
    events_after: list[JobEvent]
    last_checkpoint: Path


@pytest.fixture(scope="module")
def drained(deployment: Deployment, served: Served) -> Drained:
    running = deployment.start()
    try:
        running.wait_serving()
        result = served.job.result
        served_again = predict(running, result.served_model, result.served_version, image(deployment))
        job_id = create_job(running, job_spec("resumable", RESUMABLE_EPOCHS, served=False))

        def checkpointed() -> int | None:
            found = [e for e in events(running, job_id) if e.kind == "CHECKPOINT"]
            return int(found[0].data["epoch"]) if found else None

        epoch = wait_for(checkpointed, JOB_TIMEOUT_S, f"job {job_id}'s first checkpoint")
    finally:
        stopped = running.stop()
    # The volume as the stopped container left it.
    store = JobStore(deployment.state_dir / "jobs.sqlite3")
    try:
        state, found = store.get_job(job_id).state, store.events_after(job_id)
    finally:
        store.close()
    last = deployment.state_dir / "jobs" / job_id / "checkpoints" / "last.pt"
    return Drained(served_again, job_id, epoch, stopped, state, found, last)


def test_the_served_model_is_served_again_after_a_restart(served: Served, drained: Drained) -> None:
    assert [label for label, _ in drained.served_again] == [label for label, _ in served.via_api]


def test_sigterm_mid_training_exits_0_within_the_grace_period(drained: Drained) -> None:
    stopped = drained.stopped
    assert stopped.returncode == 0, stopped.log[-3000:]
    assert stopped.seconds < GRACE_PERIOD_S
    assert stopped.leftovers == []  # the worker, its loaders and TorchServe are all gone


def test_a_drained_job_is_queued_with_its_checkpoint(drained: Drained) -> None:
    assert drained.state_after == JobState.QUEUED
    messages = [e.message for e in drained.events_after]
    assert any(m.startswith("training stopped (draining)") for m in messages), messages
    checkpoints = [e for e in drained.events_after if e.kind == EventKind.CHECKPOINT]
    assert 1 <= len(checkpoints) < RESUMABLE_EPOCHS  # it stopped mid-training, not at the end
    assert drained.last_checkpoint.is_file()


# ------------------------------------------------------------------------------------ 3. resume


@dataclass(frozen=True)
class Resumed:
    job: pb.Job
    events: list[pb.JobEvent]
    stopped: Stopped


@pytest.fixture(scope="module")
def resumed(deployment: Deployment, drained: Drained) -> Resumed:
    running = deployment.start()
    try:
        running.wait_serving()
        job = wait_final(running, drained.job_id)
        found = events(running, drained.job_id)
    finally:
        stopped = running.stop()
    return Resumed(job, found, stopped)


def test_the_interrupted_job_resumes_from_its_checkpoint_and_finishes(
    drained: Drained, resumed: Resumed
) -> None:
    assert resumed.job.state == pb.SUCCEEDED, resumed.job.error
    assert resumed.job.result.epochs_completed == RESUMABLE_EPOCHS
    assert resumed.job.attempts == 1  # a drain is no failed attempt
    resumes = [e for e in resumed.events if e.message.startswith("resumed from")]
    assert len(resumes) == 1, [e.message for e in resumed.events]
    last_saved = max(int(e.data["epoch"]) for e in drained.events_after if e.kind == EventKind.CHECKPOINT)
    assert resumes[0].data["path"] == str(drained.last_checkpoint.resolve())
    assert int(resumes[0].data["epoch"]) == last_saved >= drained.first_checkpoint_epoch
    epochs = [int(e.data["epoch"]) for e in resumed.events if e.kind == "EPOCH"]
    assert epochs == list(range(1, RESUMABLE_EPOCHS + 1))  # no epoch lost, none trained twice


def test_the_restarted_service_stops_cleanly_too(resumed: Resumed) -> None:
    assert resumed.stopped.returncode == 0, resumed.stopped.log[-3000:]
    assert resumed.stopped.leftovers == []
