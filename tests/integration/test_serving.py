"""Serving against one real TorchServe on loopback (started once for the module, in tmp folders)."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from PIL import Image
from reliability import record

from bench.deploy_stall import archive_with_handler_prelude, wait_for_file_prelude
from handlers.inference import ImageClassifier
from service.errors import FailedPrecondition, NotFound, Unavailable
from service.packaging.archiver import build_archive
from service.packaging.gate import GateFailed
from service.packaging.mar_files import sha256_of
from service.packaging.torchserve_backend import TorchServeBackend
from service.packaging.ts_config import grpc_inference_target, inference_url, management_url, metrics_url
from service.serving_types import Archive, ServedModel
from service.settings import Settings
from service.spec import ServingSpec
from tests.ports import torchserve_ports

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

SERVING = ServingSpec(model_name="pets", batch_size=4, max_batch_delay_ms=200, workers=1, top_k=3)
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeBackend]:
    settings = Settings.model_validate(
        {
            "state_dir": tmp_path_factory.mktemp("state"),
            **torchserve_ports(),
            "torchserve_java_heap": "256m",
            "torchserve_start_timeout_s": 120,
            "max_image_pixels": MAX_PIXELS,
        }
    )
    # One torch thread per process: on a busy shared CPU, spinning OpenMP threads make inference ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    serving = TorchServeBackend(settings, worker_threads=1)
    serving.start()
    yield serving
    serving.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(serving_checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("jobs")
    paths = {"a": folder / "a" / "best.pt", "b": folder / "b" / "best.pt"}
    serving_checkpoint_factory(paths["a"], seed=1)
    serving_checkpoint_factory(paths["b"], seed=2)
    return paths


@pytest.fixture(scope="module")
def pets_v1(
    backend: TorchServeBackend, checkpoints: dict[str, Path], serving_images: list[bytes]
) -> ServedModel:
    archive = backend.package(checkpoints["a"], "pets")
    return backend.deploy(
        archive, serving_images, job_id="job-a", checkpoint=checkpoints["a"], serving=SERVING
    )


def _in_process(checkpoint: Path, images: list[bytes], top_k: int = 3) -> list[Any]:
    classifier = _classifier(checkpoint)
    return [classifier.handle([{"data": image, "top_k": top_k}])[0] for image in images]


@functools.cache
def _classifier(checkpoint: Path) -> ImageClassifier:
    return ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))


def _rest_with_timeout(backend: TorchServeBackend, path: str, body: bytes, *, timeout_s: float) -> Any:
    """An answer within timeout_s (a bound only a hung request reaches), on a connection of its own."""
    headers = {"Content-Type": "application/octet-stream", **backend.process.keys().header("inference")}
    request = urllib.request.Request(inference_url(backend.settings) + path, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _rest(backend: TorchServeBackend, path: str, body: bytes, key: str | None = None) -> tuple[int, Any]:
    key = backend.process.keys().inference if key is None else key
    headers = {
        "Content-Type": "application/octet-stream",
        **({"Authorization": f"Bearer {key}"} if key else {}),
    }
    request = urllib.request.Request(inference_url(backend.settings) + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_same_top_k(got: list[Any], expected: list[Any]) -> None:
    assert len(got) == len(expected)
    for have, want in zip(got, expected, strict=True):
        assert [s["label"] for s in have] == [s["label"] for s in want]
        assert [s["probability"] for s in have] == pytest.approx([s["probability"] for s in want], abs=1e-4)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_deployed_model_is_the_ready_default(pets_v1: ServedModel):
    assert (pets_v1.name, pets_v1.version, pets_v1.is_default, pets_v1.ready) == ("pets", "1", True, True)
    assert pets_v1.versions == ("1",) and pets_v1.job_id == "job-a"


def test_rest_grpc_and_predict_answer_like_the_checkpoint_in_process(
    backend: TorchServeBackend,
    pets_v1: ServedModel,
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    expected = _in_process(checkpoints["a"], serving_images)
    rest = [_rest(backend, "/predictions/pets/1", image) for image in serving_images]
    assert {status for status, _ in rest} == {200}
    _assert_same_top_k([answer for _, answer in rest], expected)

    from service.packaging.ts_gen import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(grpc_inference_target(backend.settings)) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        metadata = [("authorization", f"Bearer {backend.process.keys().inference}")]
        replies = [
            stub.Predictions(
                inference_pb2.PredictionsRequest(model_name="pets", input={"data": image}), metadata=metadata
            )
            for image in serving_images
        ]
    _assert_same_top_k([json.loads(r.prediction) for r in replies], expected)

    result = backend.predict("pets", None, serving_images, 3)
    assert (result.model, result.version) == ("pets", "")
    as_dicts = [
        [{"label": s.label, "probability": s.probability} for s in p.scores] for p in result.predictions
    ]
    _assert_same_top_k(as_dicts, expected)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    backend: TorchServeBackend,
    pets_v1: ServedModel,
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    images = serving_images * 2
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(lambda image: _rest(backend, "/predictions/pets/1", image)[1], images))
    _assert_same_top_k(answers, _in_process(checkpoints["a"], images))
    with urllib.request.urlopen(metrics_url(backend.settings) + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    sizes = [int(line.split('BatchSize="')[1].split('"')[0]) for line in metrics.splitlines()
             if line.startswith("TuneserveBatches{")]  # fmt: skip
    assert max(sizes) > 1, metrics


def test_bad_empty_and_huge_images_fail_alone_and_the_worker_stays_up(
    backend: TorchServeBackend, pets_v1: ServedModel, serving_images: list[bytes]
):
    assert _rest(backend, "/predictions/pets", b"\x89PNG not really")[0] == 400
    status, answer = _rest(backend, "/predictions/pets", b"")
    assert status == 400 and "empty request" in answer["error"]
    status, answer = _rest(backend, "/predictions/pets", _png(1200, 1000))
    assert status == 400 and "1200x1000 = 1200000 pixels; the limit is 1000000" in answer["error"]

    mixed = backend.predict(
        "pets", "1", [b"junk", serving_images[0], b"", serving_images[1]], None
    ).predictions
    assert [bool(p.error) for p in mixed] == [True, False, True, False]
    assert "not a JPEG, PNG" in mixed[0].error and len(mixed[1].scores) == 3
    assert backend.health() == {"torchserve": True, "torchserve/pets": True}


def test_requests_without_the_key_are_refused(
    backend: TorchServeBackend, pets_v1: ServedModel, serving_images
):
    status, answer = _rest(backend, "/predictions/pets", serving_images[0], key="")
    assert status == 400 and answer["type"] == "InvalidKeyException"  # TorchServe 0.12 answers 400
    request = urllib.request.Request(management_url(backend.settings) + "/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400

    from service.packaging.ts_gen import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(grpc_inference_target(backend.settings)) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.Predictions(
                inference_pb2.PredictionsRequest(model_name="pets", input={"data": serving_images[0]})
            )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_models_and_versions_are_not_found(
    backend: TorchServeBackend, pets_v1: ServedModel, serving_images
):
    with pytest.raises(NotFound, match="model 'cats' is not served"):
        backend.predict("cats", None, serving_images[:1], None)
    with pytest.raises(NotFound, match="has no version '7'"):
        backend.predict("pets", "7", serving_images[:1], None)


def test_a_second_version_becomes_the_default_and_rollback_restores_the_first(
    backend: TorchServeBackend,
    pets_v1: ServedModel,
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    archive = backend.package(checkpoints["b"], "pets")
    v2 = backend.deploy(archive, job_id="job-b", checkpoint=checkpoints["b"], serving=SERVING)
    assert (v2.version, v2.is_default, v2.versions) == ("2", True, ("1", "2"))
    default = [_rest(backend, "/predictions/pets", image)[1] for image in serving_images]
    _assert_same_top_k(default, _in_process(checkpoints["b"], serving_images))

    rolled_back = backend.set_default("pets", "1")
    assert (rolled_back.version, rolled_back.is_default) == ("1", True)
    default = [_rest(backend, "/predictions/pets", image)[1] for image in serving_images]
    _assert_same_top_k(default, _in_process(checkpoints["a"], serving_images))
    assert [(m.name, m.version, m.versions) for m in backend.list_served()] == [("pets", "1", ("1", "2"))]


def test_the_gate_refuses_a_tampered_archive_and_the_default_stays(
    backend: TorchServeBackend, pets_v1: ServedModel, checkpoints: dict[str, Path], tmp_path: Path
):
    staging = tmp_path / "staging"
    archive = build_archive(checkpoints["a"], staging, "pets", "3")
    tampered = backend.settings.model_store / archive.path.name
    with zipfile.ZipFile(archive.path) as original, zipfile.ZipFile(tampered, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "model.pt":
                state = torch.load(io.BytesIO(data), weights_only=True)
                head = [k for k in state if k.startswith("classifier.3.")]  # mobilenet_v3_small's last layer
                for k in head:
                    state[k] = state[k] * 1.01
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
            copy.writestr(item, data)
    default_before = {m.name: m.version for m in backend.list_served()}["pets"]
    with pytest.raises(GateFailed, match="version 3 of model pets was not promoted") as failed:
        backend.deploy(
            replace(archive, path=tampered, sha256=sha256_of(tampered)),
            job_id="job-c",
            checkpoint=checkpoints["a"],
            serving=SERVING,
        )
    assert not failed.value.result.passed and "in TorchServe but" in failed.value.result.reason
    served = {m.name: m for m in backend.list_served()}["pets"]
    assert served.version == default_before and "3" not in served.versions
    with pytest.raises(NotFound):
        backend.management.describe("pets", "3")


def test_an_archive_that_changed_since_packaging_is_not_registered(
    backend: TorchServeBackend, pets_v1: ServedModel
):
    archive = backend.settings.model_store / "pets-v1.mar"
    with pytest.raises(FailedPrecondition, match="changed since"):
        backend.deploy(
            Archive(archive, "0" * 64, "pets", "1"),
            job_id="job-a",
            checkpoint=Path("unused"),
            serving=SERVING,
        )


def _archive_with_handler_prelude(
    backend: TorchServeBackend, checkpoint: Path, name: str, prelude: str
) -> Archive:
    """A real archive of `checkpoint` as version 1 of `name`, whose TorchServe handler module runs
    `prelude` first when TorchServe's worker imports it."""
    archive = build_archive(checkpoint, backend.settings.model_store.parent / f"staging-{name}", name, "1")
    target = backend.settings.model_store / archive.path.name
    archive_with_handler_prelude(archive.path, target, prelude)
    return replace(archive, path=target, sha256=sha256_of(target))


def _slow_loading_archive(backend: TorchServeBackend, checkpoint: Path, name: str, release: Path) -> Archive:
    """A version whose TorchServe worker does not finish loading until `release` exists."""
    return _archive_with_handler_prelude(backend, checkpoint, name, wait_for_file_prelude(release))


@pytest.mark.reliability
def test_a_version_whose_worker_cannot_load_is_refused_and_not_left_registered(
    backend: TorchServeBackend,
    pets_v1: ServedModel,
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    broken = _archive_with_handler_prelude(
        backend, checkpoints["b"], "broken", "raise RuntimeError('this handler cannot load')\n"
    )
    did_not_load = "model broken version 1 did not load: its worker died while loading 2 times"
    with pytest.raises(Unavailable, match=did_not_load):
        backend.deploy(
            broken, serving_images, job_id="job-broken", checkpoint=checkpoints["b"],
            serving=SERVING.model_copy(update={"model_name": "broken"}),
        )  # fmt: skip
    # unregistered, so TorchServe is not left restarting its worker for ever
    with pytest.raises(NotFound):
        backend.management.describe("broken")
    assert [m.name for m in backend.list_served()] == ["pets"]
    record(
        "fault",
        "deploy of a version whose TorchServe handler raises when its worker imports it",
        1,
        "UNAVAILABLE 'did not load: its worker died while loading 2 times' once TorchServe's second new "
        "process for the worker died; the version unregistered from TorchServe (no retries left running); "
        "the served models unchanged",
    )


@pytest.mark.reliability
def test_a_version_still_loading_holds_up_changes_to_its_model_only(
    backend: TorchServeBackend,
    pets_v1: ServedModel,
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
    tmp_path: Path,
):
    release = tmp_path / "release"
    slow = _slow_loading_archive(backend, checkpoints["b"], "slow", release)
    pool = ThreadPoolExecutor(max_workers=3)
    try:
        deploy = pool.submit(
            backend.deploy, slow, serving_images, job_id="job-slow", checkpoint=checkpoints["b"],
            serving=SERVING.model_copy(update={"model_name": "slow"}),
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until TorchServe has the version, its worker loading
            try:
                (info,) = backend.management.describe("slow", "1")
                if not info.ready:
                    break
            except NotFound:
                pass
            assert not deploy.done(), deploy.exception()
            time.sleep(0.2)
        else:
            pytest.fail("TorchServe never listed the slow version while it loaded")
        # TorchServe answers other models meanwhile, on every connection (each new one lands on the
        # next of its Netty threads; a synchronous registration would hold one of them until loaded)
        for _ in range(8):
            _rest_with_timeout(backend, "/predictions/pets", serving_images[0], timeout_s=60)
        pets = {m.name: m for m in backend.list_served()}["pets"]
        # another model's rollback is not held up by the loading version
        other = pool.submit(backend.set_default, "pets", pets.version)
        assert other.result(timeout=60).is_default
        assert not deploy.done()
        # a change to the loading model waits for its deploy (it is not served yet: NotFound if not)
        unserve_slow = pool.submit(backend.unserve, "slow")
        time.sleep(0.5)
        assert not unserve_slow.done() and not deploy.done()
        release.touch()
        served = deploy.result(timeout=180)
        assert (served.name, served.version, served.is_default, served.ready) == ("slow", "1", True, True)
        unserve_slow.result(timeout=120)
        assert [m.name for m in backend.list_served()] == ["pets"]
        record(
            "fault",
            "a version whose TorchServe worker does not finish loading until the test lets it, while "
            "another model is served",
            1,
            "8 predictions of the other model, each on a new connection, answered while it loaded; a "
            "SetDefaultVersion of the other model answered; an UnserveModel of the loading model waited "
            "for its deploy (promoted once loaded) and then removed it",
        )
    finally:
        release.touch()  # never leave TorchServe's worker waiting
        pool.shutdown(wait=True)


def test_a_killed_torchserve_is_restarted_with_its_models(
    backend: TorchServeBackend,
    pets_v1: ServedModel,
    checkpoints: dict[str, Path],
    serving_images: list[bytes],
):
    java = backend.process.java_pid()
    assert java is not None
    restarts = backend.restarts
    os.kill(java, signal.SIGKILL)
    deadline = time.monotonic() + 150
    while backend.restarts == restarts and time.monotonic() < deadline:
        time.sleep(0.5)
    assert backend.restarts == restarts + 1
    assert backend.health() == {"torchserve": True, "torchserve/pets": True}
    served = {m.name: m for m in backend.list_served()}["pets"]
    assert served.ready and served.versions == ("1", "2")
    predictions = backend.predict("pets", None, serving_images, 3).predictions
    as_dicts = [[{"label": s.label, "probability": s.probability} for s in p.scores] for p in predictions]
    _assert_same_top_k(
        as_dicts, _in_process(checkpoints[{"1": "a", "2": "b"}[served.version]], serving_images)
    )


def test_unserving_a_version_keeps_the_others(backend: TorchServeBackend, pets_v1: ServedModel):
    backend.unserve("pets", "2")
    (served,) = backend.list_served()
    assert served.versions == ("1",)
    backend.unserve("pets")
    assert backend.list_served() == []
    with pytest.raises(NotFound):
        backend.predict("pets", None, [b"x"], None)


def test_after_unserving_everything_the_next_version_still_follows_the_model_store(
    backend: TorchServeBackend, checkpoints: dict[str, Path]
):
    assert backend.list_served() == []  # nothing served any more, but versions 1-3 are in the store
    archive = backend.package(checkpoints["a"], "pets")
    assert (archive.version, archive.path.name) == ("4", "pets-v4.mar")
