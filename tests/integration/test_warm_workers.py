"""Warm TorchServe workers (service.packaging.ts_zygote) against one real TorchServe on loopback:
workers are forked from the zygote and answer like the checkpoint; a worker killed, a launcher killed,
the zygote killed, a version unregistered: TorchServe serves on, and no process is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from reliability import record

from handlers.inference import ImageClassifier
from service.packaging.torchserve_backend import TorchServeBackend
from service.serving_types import ServedModel
from service.settings import Settings
from service.spec import ServingSpec
from tests.ports import torchserve_ports

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.reliability,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

SERVING = ServingSpec(model_name="pets", batch_size=1, max_batch_delay_ms=0, workers=1, top_k=3)
WARM_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeBackend]:
    settings = Settings.model_validate(
        {
            "state_dir": tmp_path_factory.mktemp("state"),
            **torchserve_ports(),
            "torchserve_java_heap": "256m",
            "torchserve_start_timeout_s": 120,
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared CPU: one thread per process
    serving = TorchServeBackend(settings, worker_threads=1)
    serving.start()
    _wait(serving.process.warm.is_warm, "the zygote to listen")
    yield serving
    serving.stop()
    torch.set_num_threads(threads)
    assert not serving.process.warm.is_running()


@pytest.fixture(scope="module")
def pets(backend: TorchServeBackend, serving_checkpoint: Path, serving_images: list[bytes]) -> ServedModel:
    archive = backend.package(serving_checkpoint, "pets")
    return backend.deploy(
        archive, serving_images, job_id="job-a", checkpoint=serving_checkpoint, serving=SERVING
    )


def test_a_registered_version_runs_in_a_worker_forked_from_the_zygote(
    backend: TorchServeBackend, pets: ServedModel, serving_checkpoint: Path, serving_images: list[bytes]
):
    (worker,) = _forked_workers(backend)
    launcher = _launcher_of(backend, worker)
    assert launcher is not None, "no launcher of TorchServe's waits on the forked worker"
    _assert_answers_like_the_checkpoint(backend, serving_checkpoint, serving_images)


def test_a_killed_worker_is_forked_again_and_serves(
    backend: TorchServeBackend, pets: ServedModel, serving_checkpoint: Path, serving_images: list[bytes]
):
    (worker,) = _forked_workers(backend)
    os.kill(worker, signal.SIGKILL)
    _wait(lambda: _forked_workers(backend) not in ([], [worker]), "a new forked worker")
    _wait(lambda: backend.versions.ready("pets", pets.version), "the version to be ready again")
    _assert_answers_like_the_checkpoint(backend, serving_checkpoint, serving_images)
    record(
        "fault",
        "SIGKILL of a TorchServe Python worker forked from the zygote (warm workers) while served",
        1,
        "TorchServe started its next worker, forked warm from the zygote again; the version was ready again "
        "and answered the gate's images like the checkpoint in-process",
    )


def test_a_killed_launcher_takes_its_worker_with_it(
    backend: TorchServeBackend, pets: ServedModel, serving_checkpoint: Path, serving_images: list[bytes]
):
    (worker,) = _forked_workers(backend)
    launcher = _launcher_of(backend, worker)
    assert launcher is not None
    os.kill(launcher, signal.SIGKILL)  # what a forced stop of TorchServe's worker process does
    _wait(lambda: not psutil.pid_exists(worker) or _zombie(worker), "the orphaned worker to be killed")
    _wait(lambda: backend.versions.ready("pets", pets.version), "the version to be ready again")
    _assert_answers_like_the_checkpoint(backend, serving_checkpoint, serving_images)
    record(
        "fault",
        "SIGKILL of the launcher TorchServe runs as a warm worker's Python",
        1,
        "the forked worker it stood for was killed with it (no orphan); TorchServe started another and the "
        "version answered like the checkpoint",
    )


def test_without_the_zygote_workers_start_cold_and_it_comes_back(
    backend: TorchServeBackend, pets: ServedModel, serving_checkpoint: Path, serving_images: list[bytes]
):
    warm = backend.process.warm
    zygote = warm._popen.pid if warm._popen is not None else None
    assert zygote is not None
    (worker,) = _forked_workers(backend)
    os.kill(zygote, signal.SIGKILL)  # its forked workers die with it; TorchServe starts them again
    _wait(lambda: not psutil.pid_exists(worker) or _zombie(worker), "the forked worker to die")
    _wait(lambda: backend.versions.ready("pets", pets.version), "the version to be ready again")
    _assert_answers_like_the_checkpoint(backend, serving_checkpoint, serving_images)
    # the watchdog starts the zygote again; the next worker is warm again
    _wait(lambda: warm.is_warm() and warm._popen is not None and warm._popen.pid != zygote, "a new zygote")
    record(
        "fault",
        "SIGKILL of the warm-worker zygote while a model is served",
        1,
        "its forked worker died with it; TorchServe's next worker started cold (the real Python) and "
        "answered like the checkpoint; the service started a new zygote, and workers fork warm again",
    )


def test_unregistering_leaves_no_worker_behind(backend: TorchServeBackend, pets: ServedModel):
    _wait(lambda: bool(_forked_workers(backend)) or bool(_cold_workers(backend)), "a worker")
    before = _forked_workers(backend) + _cold_workers(backend)
    backend.unserve("pets")
    _wait(lambda: not any(psutil.pid_exists(p) and not _zombie(p) for p in before), "the workers to end")
    assert _forked_workers(backend) == []


# ----------------------------------------------------------------------------------------- helpers


def _forked_workers(backend: TorchServeBackend) -> list[int]:
    popen = backend.process.warm._popen
    if popen is None or not psutil.pid_exists(popen.pid):
        return []
    return sorted(c.pid for c in psutil.Process(popen.pid).children() if c.status() != psutil.STATUS_ZOMBIE)


def _cold_workers(backend: TorchServeBackend) -> list[int]:
    java = backend.process.java_pid()
    if java is None:
        return []
    return [
        c.pid
        for c in psutil.Process(java).children()
        if any("model_service_worker" in part for part in c.cmdline())
    ]


def _launcher_of(backend: TorchServeBackend, worker: int) -> int | None:
    """The launcher (a child of TorchServe's JVM) that the zygote forked `worker` for: its command line
    ends with the worker's socket, as the worker's does."""
    java = backend.process.java_pid()
    assert java is not None
    socket_name = _argument(psutil.Process(worker).cmdline(), "--sock-name")
    for child in psutil.Process(java).children():
        command = child.cmdline()
        ours = any(part.endswith("/worker-python") for part in command[:3])  # python -IS <script>
        if ours and (socket_name is None or _argument(command, "--sock-name") == socket_name):
            return child.pid
    return None


def _argument(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_answers_like_the_checkpoint(
    backend: TorchServeBackend, checkpoint: Path, images: list[bytes]
) -> None:
    classifier = ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))
    expected = [classifier.handle([{"data": image, "top_k": 3}])[0] for image in images]
    got = backend.predict("pets", None, images, 3).predictions
    for want, have in zip(expected, got, strict=True):
        assert [s.label for s in have.scores] == [s["label"] for s in want]
        assert [s.probability for s in have.scores] == pytest.approx(
            [s["probability"] for s in want], abs=1e-4
        )


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = WARM_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
