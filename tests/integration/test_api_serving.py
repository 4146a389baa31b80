"""The serving RPCs against a real service and its real TorchServe (started once for the module).

A tiny job trains for real (not served on its own), ServeJob serves it as version 1 of `pets` behind
the promotion gate (on the job's own validation images), and a second checkpoint is deployed as
version 2, so the version RPCs have something to switch between.
"""

from __future__ import annotations

import functools
import io
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import FINAL, all_events, channel_to, make_image_folder, spec, stub, wait_for, wait_state
from torchserve_service import running_torchserve_service

from handlers.inference import ImageClassifier
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service
from service.packaging.archiver import build_archive
from service.packaging.mar_files import sha256_of
from service.packaging.ts_config import inference_url
from service.spec import DataSpec, ServingSpec
from service.training.scan import load_splits

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(900),
]

CLASSES = ("class_0", "class_1")
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("api-serving")
    make_image_folder(root / "data" / "ds")
    with running_torchserve_service(root) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with channel_to(service) as channel:
        yield channel


@pytest.fixture(scope="module")
def client(channel: grpc.Channel) -> pb_grpc.FineTuningStub:
    return stub(channel)


@pytest.fixture(scope="module")
def inference(channel: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def trained(client: pb_grpc.FineTuningStub) -> pb.Job:
    """A tiny job of model `pets`, trained and packaged for real but not served (serving.enabled false)."""
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("pets")))
    final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=600)
    assert final.state == pb.SUCCEEDED, final.error
    return final


@pytest.fixture(scope="module")
def served(client: pb_grpc.FineTuningStub, trained: pb.Job) -> pb.ServedModel:
    """ServeJob of the trained job: version 1 of `pets`."""
    return client.ServeJob(pb.ServeJobRequest(job_id=trained.id), timeout=600)


@pytest.fixture(scope="module")
def second_version(
    service: Service, served: pb.ServedModel, serving_checkpoint_factory: Any, tmp_path_factory: Any
) -> Path:
    """A second checkpoint with the same classes, deployed as version 2 (now the default); its path."""
    checkpoint = tmp_path_factory.mktemp("v2") / "best.pt"
    serving_checkpoint_factory(checkpoint, class_names=CLASSES, seed=3)
    backend = service.backend
    archive = backend.package(checkpoint, "pets")
    spec = ServingSpec(model_name="pets", batch_size=4, max_batch_delay_ms=50, workers=1, top_k=2)
    backend.deploy(archive, job_id="job-v2", checkpoint=checkpoint, serving=spec)
    return checkpoint


@functools.cache
def _classifier(checkpoint: str) -> ImageClassifier:
    return ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))


def in_process(checkpoint: str | Path, images: list[bytes], top_k: int) -> list[list[tuple[str, float]]]:
    """What the checkpoint answers in this process, through the handler's own code."""
    classifier = _classifier(str(checkpoint))
    answers = [classifier.handle([{"data": image, "top_k": top_k}])[0] for image in images]
    return [[(s["label"], s["probability"]) for s in answer] for answer in answers]


def assert_answers_like(answer: pb.PredictResponse, expected: list[list[tuple[str, float]]]) -> None:
    got = [[(s.label, s.probability) for s in p.scores] for p in answer.predictions]
    assert [[label for label, _ in scores] for scores in got] == [[label for label, _ in e] for e in expected]
    for have, want in zip(got, expected, strict=True):
        assert [p for _, p in have] == pytest.approx([p for _, p in want], abs=1e-4)


# ------------------------------------------------------------------------------------------- tests


def test_inference_is_serving_when_torchserve_is_up(channel: grpc.Channel) -> None:
    request = health_pb2.HealthCheckRequest(service="tuneserve.v1.Inference")
    assert health_pb2_grpc.HealthStub(channel).Check(request).status == SERVING


def test_serve_job_serves_a_trained_job_as_the_ready_default(
    service: Service, client: pb_grpc.FineTuningStub, trained: pb.Job, served: pb.ServedModel
) -> None:
    assert (served.name, served.version, served.is_default, served.ready) == ("pets", "1", True, True)
    assert list(served.versions) == ["1"] and served.job_id == trained.id
    assert served.archive_sha256 == trained.result.archive_sha256
    assert served.inference_url == f"{inference_url(service.settings)}/predictions/pets"
    assert served.inference_url.startswith("http://127.0.0.1:")
    job = client.GetJob(pb.GetJobRequest(job_id=trained.id))
    assert (job.result.served_model, job.result.served_version) == ("pets", "1")


def test_the_job_records_its_gate_sample_and_the_gate_compared_exactly_those_images(
    service: Service, client: pb_grpc.FineTuningStub, trained: pb.Job, served: pb.ServedModel
) -> None:
    root = service.settings.data_root.resolve()
    splits = load_splits(DataSpec(path="ds", val_fraction=0.25), "multiclass", root, seed=0)
    validation = {s.path.relative_to(root).as_posix() for s in splits.val}
    sample = list(trained.result.gate_sample)  # as GetJob reports it
    assert len(sample) == 2 and set(sample) == validation  # 1 of the 4 images per class is held out
    assert {path.split("/")[1] for path in sample} == set(CLASSES)
    gate = [e for e in all_events(client, trained.id) if e.message.startswith("promotion gate")]
    assert len(gate) == 1 and gate[0].kind == "INFO", [e.message for e in gate]
    assert "version 1 of pets answers like its checkpoint on 2 validation images" in gate[0].message
    assert (gate[0].data["images"], gate[0].data["source"]) == (len(sample), "validation images")


def test_predict_answers_like_the_served_checkpoint_in_process(
    inference: pb_grpc.InferenceStub, trained: pb.Job, served: pb.ServedModel, serving_images: list[bytes]
) -> None:
    answer = inference.Predict(pb.PredictRequest(model="pets", images=serving_images, top_k=2), timeout=120)
    assert answer.model == "pets" and len(answer.predictions) == len(serving_images)
    assert_answers_like(answer, in_process(trained.result.best_checkpoint, serving_images, top_k=2))
    assert {s.label for p in answer.predictions for s in p.scores} <= set(CLASSES)


def test_a_bad_image_fails_alone(
    inference: pb_grpc.InferenceStub, served: pb.ServedModel, serving_images: list[bytes]
) -> None:
    answer = inference.Predict(
        pb.PredictRequest(model="pets", images=[b"junk", serving_images[0]]), timeout=120
    )
    assert answer.predictions[0].error and not answer.predictions[0].scores
    assert not answer.predictions[1].error and answer.predictions[1].scores


def test_the_served_model_gets_its_own_health_name(channel: grpc.Channel, served: pb.ServedModel) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    def pets_serving() -> bool:
        request = health_pb2.HealthCheckRequest(service="torchserve/pets")
        try:
            return health.Check(request).status == SERVING
        except grpc.RpcError:  # NOT_FOUND until the reporter has published the name
            return False

    wait_for(pets_serving, timeout=30, what="torchserve/pets to be SERVING")


@pytest.mark.parametrize(
    ("model", "version", "fragment"),
    [("cats", "", "model 'cats' is not served"), ("pets", "7", "has no version '7'")],
)
def test_predict_of_an_unknown_model_or_version_is_not_found(
    inference: pb_grpc.InferenceStub,
    served: pb.ServedModel,
    serving_images: list[bytes],
    model: str,
    version: str,
    fragment: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        inference.Predict(pb.PredictRequest(model=model, version=version, images=serving_images[:1]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert fragment in caught.value.details()


def test_a_negative_top_k_is_an_invalid_argument_naming_it(
    inference: pb_grpc.InferenceStub, served: pb.ServedModel, serving_images: list[bytes]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        inference.Predict(pb.PredictRequest(model="pets", images=serving_images[:1], top_k=-2))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k -2" in caught.value.details()


def test_serve_job_of_an_unknown_job_is_not_found(client: pb_grpc.FineTuningStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.ServeJob(pb.ServeJobRequest(job_id="job-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "job-nope" in caught.value.details()


def test_serve_job_of_an_unfinished_job_is_a_failed_precondition(
    client: pb_grpc.FineTuningStub, served: pb.ServedModel
) -> None:
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("unfinished", training={"epochs": 500})))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            client.ServeJob(pb.ServeJobRequest(job_id=job.id))
    finally:
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
        wait_state(client, job.id, (pb.CANCELLED, pb.FAILED, pb.SUCCEEDED), timeout=120)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details()
    assert job.id in details and "no archive" in details and "only a SUCCEEDED job" in details


def test_a_second_version_becomes_the_listed_default(
    client: pb_grpc.FineTuningStub, trained: pb.Job, second_version: Path
) -> None:
    listed = client.ListServedModels(pb.ListServedModelsRequest()).models
    assert [(m.name, m.version, m.is_default, list(m.versions)) for m in listed] == [
        ("pets", "2", True, ["1", "2"])
    ]
    assert listed[0].job_id == "job-v2" and listed[0].ready


def test_set_default_version_rolls_predictions_back_to_version_1(
    client: pb_grpc.FineTuningStub,
    inference: pb_grpc.InferenceStub,
    trained: pb.Job,
    second_version: Path,
    serving_images: list[bytes],
) -> None:
    request = pb.PredictRequest(model="pets", images=serving_images, top_k=2)
    assert_answers_like(
        inference.Predict(request, timeout=120), in_process(second_version, serving_images, 2)
    )
    default = client.SetDefaultVersion(pb.SetDefaultVersionRequest(name="pets", version="1"))
    assert (default.name, default.version, default.is_default, default.job_id) == (
        "pets",
        "1",
        True,
        trained.id,
    )
    expected = in_process(trained.result.best_checkpoint, serving_images, 2)
    assert_answers_like(inference.Predict(request, timeout=120), expected)


def test_set_default_to_an_unknown_version_is_not_found(
    client: pb_grpc.FineTuningStub, second_version: Path
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.SetDefaultVersion(pb.SetDefaultVersionRequest(name="pets", version="9"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no version '9'" in caught.value.details() and "versions: 1, 2" in caught.value.details()


def test_unserve_of_one_version_leaves_the_others(
    client: pb_grpc.FineTuningStub, inference: pb_grpc.InferenceStub, second_version: Path, serving_images
) -> None:
    client.UnserveModel(pb.UnserveModelRequest(name="pets", version="2"))
    listed = client.ListServedModels(pb.ListServedModelsRequest()).models
    assert [(m.name, list(m.versions)) for m in listed] == [("pets", ["1"])]
    with pytest.raises(grpc.RpcError) as caught:
        inference.Predict(pb.PredictRequest(model="pets", version="2", images=serving_images[:1]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_unserve_of_the_whole_model_empties_the_list(
    client: pb_grpc.FineTuningStub, inference: pb_grpc.InferenceStub, second_version: Path, serving_images
) -> None:
    client.UnserveModel(pb.UnserveModelRequest(name="pets"))
    assert list(client.ListServedModels(pb.ListServedModelsRequest()).models) == []
    with pytest.raises(grpc.RpcError) as caught:
        inference.Predict(pb.PredictRequest(model="pets", images=serving_images[:1]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_version_that_disagrees_on_the_validation_images_is_refused_naming_the_image(
    service: Service, client: pb_grpc.FineTuningStub, trained: pb.Job, tmp_path: Path
) -> None:
    """The job's archive swapped for one whose head was altered: the gate compares on the job's own
    validation images and the refusal names one of them, both answers and the tolerance."""
    archive = build_archive(Path(trained.result.best_checkpoint), tmp_path, "pets", "9")
    altered = service.settings.model_store / archive.path.name
    with zipfile.ZipFile(archive.path) as original, zipfile.ZipFile(altered, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "model.pt":
                state = torch.load(io.BytesIO(data), weights_only=True)
                state["classifier.3.bias"][0] += 2.0  # mobilenet_v3_small's last layer: class_0 favoured
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
            copy.writestr(item, data)
    store, result = service.store, trained.result
    store.update_result(trained.id, archive_path=str(altered), archive_sha256=sha256_of(altered))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            client.ServeJob(pb.ServeJobRequest(job_id=trained.id), timeout=600)
    finally:
        store.update_result(
            trained.id, archive_path=result.archive_path, archive_sha256=result.archive_sha256
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details()
    assert details.startswith("version 9 of model pets was not promoted: on 2 validation images")
    image = next(path for path in result.gate_sample if f"({path}: " in details)  # the image, by its path
    assert "the checkpoint answered 'class_" in details and ", TorchServe 'class_" in details
    assert "(tolerance 0.0001)" in details
    refused = [e for e in all_events(client, trained.id) if "was not promoted" in e.message]
    assert len(refused) == 1 and refused[0].kind == "WARNING" and refused[0].data["image"] == image
    assert "9" not in [
        v for m in client.ListServedModels(pb.ListServedModelsRequest()).models for v in m.versions
    ]


def test_a_job_served_when_it_finishes_is_gated_on_its_recorded_validation_images(
    client: pb_grpc.FineTuningStub, trained: pb.Job
) -> None:
    """The production path: the scheduler deploys a finished job (TorchServeBackend.deploy_job)."""
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("auto", serving={"enabled": True})))
    final = wait_state(client, job.id, FINAL, timeout=600)
    try:
        assert final.state == pb.SUCCEEDED, final.error
        assert (final.result.served_model, len(final.result.gate_sample)) == ("auto", 2)
        gate = [e for e in all_events(client, job.id) if e.message.startswith("promotion gate")]
        assert len(gate) == 1 and "on 2 validation images" in gate[0].message
        assert gate[0].data["passed"] and gate[0].data["max_difference"] <= 1e-4
    finally:
        client.UnserveModel(pb.UnserveModelRequest(name="auto"))
