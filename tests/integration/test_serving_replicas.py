"""The promotion gate with several control-plane replicas: two real TorchServes on one state folder.

Control-plane replicas on one PostgreSQL share the state volume: the model store and the served
registry (`torchserve/served_models.json`). Each runs its own TorchServe (TUNESERVE_TORCHSERVE_FILES_DIR,
its own ports). Here two TorchServeBackends play the two replicas (as start_service builds them, without
the job store, which the gate does not need): a version one of them gates is served by the other too,
a version the gate refuses by neither, and a new default or an unserve made through either reaches the
other within a sync (`served_sync_s`).
"""

from __future__ import annotations

import io
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from handlers.inference import ImageClassifier
from service.errors import NotFound
from service.packaging.archiver import build_archive
from service.packaging.gate import GateFailed
from service.packaging.mar_files import sha256_of
from service.packaging.replica_models import control_plane_registry
from service.packaging.served_registry import ServedRegistry
from service.packaging.torchserve_backend import TorchServeBackend
from service.settings import Settings
from service.spec import ServingSpec
from tests.ports import torchserve_ports

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(900),
]

SYNC_S = 0.5
FOLLOW_TIMEOUT_S = 180.0  # a model's first worker in a second TorchServe, on a shared 2-core CPU


def _replica(state: Path, name: str) -> TorchServeBackend:
    settings = Settings.model_validate(
        {
            "state_dir": state,  # shared: the model store and the served registry
            "torchserve_files_dir": state.parent / f"{name}-torchserve",  # its own (an emptyDir in a pod)
            "served_sync_s": SYNC_S,
            **torchserve_ports(),
            "torchserve_java_heap": "256m",
            "torchserve_start_timeout_s": 180,
        }
    )
    return TorchServeBackend(settings, worker_threads=1)


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TorchServeBackend, TorchServeBackend]]:
    root = tmp_path_factory.mktemp("replicas")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the gate's reference answers: this CPU is shared with two TorchServes
    a, b = _replica(root / "state", "a"), _replica(root / "state", "b")
    started = []
    try:
        for backend in (a, b):
            backend.start()
            started.append(backend)
        yield a, b
    finally:
        for backend in started:
            backend.stop()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(serving_checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("jobs")
    paths = {name: folder / name / "best.pt" for name in ("a", "b", "c", "d")}
    for seed, path in enumerate(paths.values(), start=1):
        serving_checkpoint_factory(path, seed=seed)
    return paths


SERVING = ServingSpec(model_name="pets", batch_size=1, max_batch_delay_ms=0, workers=1, top_k=3)


def _answers(checkpoint: Path, images: list[bytes]) -> list[list[str]]:
    classifier = ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))
    return [[s["label"] for s in classifier.handle([{"data": image, "top_k": 3}])[0]] for image in images]


def _predicted(backend: TorchServeBackend, model: str, images: list[bytes]) -> list[list[str]]:
    result = backend.predict(model, None, images, 3)
    return [[score.label for score in p.scores] for p in result.predictions]


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = FOLLOW_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


def _held_default(backend: TorchServeBackend, model: str) -> str | None:
    """The default version this replica's own TorchServe answers with (the registry's, once synced)."""
    held = backend.versions.held.get(model)
    return held.default if held is not None else None


def _serves(backend: TorchServeBackend, model: str, version: str) -> bool:
    """Ready in the replica's TorchServe, and recorded as held there (which Predict asks first): the sync
    records it once TorchServe's register call returns, a moment after TorchServe says ready."""
    return _registered(backend, model, version) and backend.versions.held.holds(model, version)


def _registered(backend: TorchServeBackend, model: str, version: str) -> bool:
    try:
        return any(info.ready for info in backend.management.describe(model, version))
    except NotFound:
        return False


def test_a_version_one_replica_gated_is_served_by_the_other(
    replicas: tuple[TorchServeBackend, TorchServeBackend],
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    a, b = replicas
    archive = a.package(checkpoints["a"], "pets")
    served = a.deploy(archive, serving_images, job_id="job-a", checkpoint=checkpoints["a"], serving=SERVING)
    assert (served.name, served.version, served.is_default) == ("pets", "1", True)
    # one registry for both, where a serving replica looks for it too
    assert (
        a.versions.registry.path == b.versions.registry.path == control_plane_registry(a.settings.model_store)
    )
    assert ServedRegistry(a.versions.registry.path).get("pets") is not None
    # b's TorchServe never saw the deploy: it registers version 1 at its next sync
    _eventually(lambda: _serves(b, "pets", "1"), "replica b serves pets version 1")
    assert _predicted(b, "pets", serving_images) == _answers(checkpoints["a"], serving_images)
    assert b.health()["torchserve/pets"] and a.health()["torchserve/pets"]


def test_a_version_the_gate_refuses_on_one_replica_is_served_by_neither(
    replicas: tuple[TorchServeBackend, TorchServeBackend],
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
    tmp_path: Path,
):
    a, b = replicas
    _eventually(lambda: b.versions.held.holds("pets", "1"), "replica b serves pets version 1")
    archive = build_archive(checkpoints["c"], tmp_path, "pets", "2")
    tampered = b.settings.model_store / archive.path.name
    with zipfile.ZipFile(archive.path) as original, zipfile.ZipFile(tampered, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "model.pt":  # the archive's weights no longer those of its checkpoint
                state = torch.load(io.BytesIO(data), weights_only=True)
                state = {k: v * 1.01 if k.startswith("classifier.3.") else v for k, v in state.items()}
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
            copy.writestr(item, data)
    with pytest.raises(GateFailed, match="version 2 of model pets was not promoted"):
        b.deploy(
            replace(archive, path=tampered, sha256=sha256_of(tampered)),
            serving_images, job_id="job-c", checkpoint=checkpoints["c"], serving=SERVING,
        )  # fmt: skip
    time.sleep(4 * SYNC_S)  # a's syncs come and go
    for backend in (a, b):
        assert not _registered(backend, "pets", "2") and not backend.versions.held.holds("pets", "2")
        assert _held_default(backend, "pets") == "1"
    entry = ServedRegistry(a.versions.registry.path).get("pets")
    assert entry is not None and sorted(entry.versions) == ["1"]


def test_a_new_default_and_an_unserve_made_through_one_replica_reach_the_other(
    replicas: tuple[TorchServeBackend, TorchServeBackend],
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    a, b = replicas
    _eventually(lambda: b.versions.held.holds("pets", "1"), "replica b serves pets version 1")
    archive = b.package(checkpoints["b"], "pets")
    served = b.deploy(archive, serving_images, job_id="job-b", checkpoint=checkpoints["b"], serving=SERVING)
    assert served.is_default
    _eventually(lambda: _held_default(a, "pets") == served.version,
                "replica a makes b's new version its default")  # fmt: skip
    assert _predicted(a, "pets", serving_images) == _answers(checkpoints["b"], serving_images)
    # rollback through a: b's TorchServe answers with version 1 again
    a.set_default("pets", "1")
    _eventually(lambda: _held_default(b, "pets") == "1", "replica b rolls back")
    assert _predicted(b, "pets", serving_images) == _answers(checkpoints["a"], serving_images)
    # unserve through a: b's TorchServe drops the version too
    a.unserve("pets", served.version)
    gone = served.version
    _eventually(lambda: not _registered(b, "pets", gone) and not b.versions.held.holds("pets", gone),
                f"replica b unregisters {gone}")  # fmt: skip
    assert _serves(b, "pets", "1")


def test_two_replicas_promoting_at_once_both_land(
    replicas: tuple[TorchServeBackend, TorchServeBackend],
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    a, b = replicas
    errors: list[BaseException] = []

    def deploy(backend: TorchServeBackend, model: str, checkpoint: Path) -> None:
        try:
            archive = backend.package(checkpoint, model)
            spec = SERVING.model_copy(update={"model_name": model})
            backend.deploy(
                archive, serving_images, job_id=f"job-{model}", checkpoint=checkpoint, serving=spec
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=deploy, args=(a, "cats", checkpoints["c"])),
        threading.Thread(target=deploy, args=(b, "dogs", checkpoints["d"])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    registry = ServedRegistry(a.versions.registry.path)
    assert {"cats", "dogs", "pets"} <= {e.name for e in registry.entries()}
    for backend in (a, b):
        for model in ("cats", "dogs"):
            _eventually(lambda: _serves(backend, model, "1"), f"{model} on both replicas")  # noqa: B023
    assert _predicted(b, "cats", serving_images) == _answers(checkpoints["c"], serving_images)
    assert _predicted(a, "dogs", serving_images) == _answers(checkpoints["d"], serving_images)
