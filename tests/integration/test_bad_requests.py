"""Bad requests: each gets its status code and a message naming the field and the bad value."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from harness import channel_to, make_image_folder, make_settings, running_service, spec, stub, wait_state

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND

Call = Callable[[pb_grpc.FineTuningStub, grpc.Channel], Any]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("bad")
    settings = make_settings(root)
    data = settings.data_root
    make_image_folder(data / "ds")
    make_image_folder(data / "three", classes=3)
    make_image_folder(data / "one", classes=1)
    make_image_folder(data / "hollow")
    for stray in (data / "hollow" / "class_1").iterdir():
        stray.unlink()
    (data / "hollow" / "class_1" / "notes.txt").write_text("not an image")
    make_image_folder(root / "outside")
    with running_service(settings) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with channel_to(service) as ch:
        yield ch


def create(name: str = "bad", **sections: dict[str, Any]) -> Call:
    return lambda client, _ch: client.CreateJob(pb.CreateJobRequest(spec=spec(name, **sections)))


def create_raw(message: pb.JobSpec, key: str = "") -> Call:
    return lambda client, _ch: client.CreateJob(pb.CreateJobRequest(spec=message, idempotency_key=key))


def without(section: str) -> pb.JobSpec:
    message = spec()
    message.ClearField(section)
    return message


CASES: list[tuple[str, Call, grpc.StatusCode, tuple[str, ...]]] = [
    ("unknown architecture", create(model={"architecture": "resnet1800"}), INVALID,
     ("spec.model.architecture", "resnet1800", "did you mean", "tuneserve models")),
    ("freeze depth too large", create(freeze={"depth": 99}), INVALID,
     ("spec.freeze.depth", "99", "allowed 0..")),
    ("freeze until an unknown layer", create(freeze={"until_layer": "layer9"}), INVALID,
     ("spec.freeze.until_layer", "layer9")),
    ("freeze depth and until_layer together", create(freeze={"depth": 1, "until_layer": "features.0"}), INVALID,
     ("spec.freeze", "give one of them")),
    ("negative freeze depth", create(freeze={"depth": -1}), INVALID, ("spec.freeze.depth", "-1")),
    ("dataset path escaping with ..", create(data={"path": "../outside"}), INVALID,
     ("spec.data.path", "../outside", "outside the data root")),
    ("absolute dataset path outside the root", create(data={"path": "/etc"}), INVALID,
     ("spec.data.path", "/etc", "outside the data root")),
    ("missing dataset", create(data={"path": "nowhere"}), INVALID, ("spec.data.path", "nowhere", "does not exist")),
    ("class folder without images", create(data={"path": "hollow"}), INVALID,
     ("spec.data.path", "class_1", "no usable images")),
    ("single class", create(data={"path": "one"}), INVALID, ("spec.data.path", "single class", "at least 2")),
    ("binary task with three classes", create(task="binary", data={"path": "three"}), INVALID,
     ("spec.data.path", "binary", "exactly 2")),
    ("validation folder outside the root", create(data={"val_path": "../outside"}), INVALID,
     ("spec.data.val_path", "../outside")),
    ("validation fraction above 1", create(data={"val_fraction": 1.5}), INVALID, ("spec.data.val_fraction", "1.5")),
    ("unknown optimizer", create(training={"optimizer": "adagrad"}), INVALID,
     ("spec.training.optimizer", "adagrad", "'sgd'")),
    ("negative learning rate", create(training={"lr": -0.1}), INVALID, ("spec.training.lr", "-0.1")),
    ("zero epochs", create(training={"epochs": 0}), INVALID, ("spec.training.epochs", "0")),
    ("image size too small", create(training={"image_size": 8}), INVALID, ("spec.training.image_size", "8")),
    ("bad job name", create("bad name!"), INVALID, ("spec.name", "bad name!")),
    ("job name with ..", create("a..b"), INVALID, ("spec.name", "a..b")),
    ("missing model", create_raw(without("model")), INVALID, ("spec.model", "Field required")),
    ("missing job name", create_raw(spec("")), INVALID, ("spec.name", "Field required")),
    ("weights_file without weights=file", create(model={"weights_file": "/tmp/w.pt"}), INVALID,
     ("spec.model", "weights_file", "weights='file'")),
    ("weights=file without a file", create(model={"weights": "file"}), INVALID,
     ("spec.model", "weights='file' needs model.weights_file")),
    ("unknown weights name", create(model={"architecture": "resnet18", "weights": "IMAGENET9K"}), INVALID,
     ("spec.model.weights", "IMAGENET9K", "IMAGENET1K_V1")),
    ("missing pretrained weights", create(model={"architecture": "resnet18", "weights": "DEFAULT"}), PRECONDITION,
     ("spec.model.weights", "resnet18-f37072fd.pth", "make weights MODELS=resnet18")),
    ("missing weights file", create(model={"weights": "file", "weights_file": "/nope/w.pt"}), PRECONDITION,
     ("spec.model.weights_file", "/nope/w.pt")),
    ("multilabel without a manifest", create(task="multilabel"), INVALID, ("data.manifest", "multilabel")),
    ("manifest for a multiclass task", create(data={"manifest": "m.csv"}), INVALID, ("data.manifest", "multiclass")),
    ("label smoothing on a binary task", create(task="binary", training={"label_smoothing": 0.1}), INVALID,
     ("training.label_smoothing", "binary")),
    ("unknown wandb mode", create(logging={"wandb": {"mode": "sometimes"}}), INVALID,
     ("spec.logging.wandb.mode", "sometimes")),
    ("serving model name with a slash", create(serving={"model_name": "a/b"}), INVALID,
     ("spec.serving.model_name", "a/b")),
    ("idempotency key too long", create_raw(spec(), "k" * 300), INVALID, ("idempotency_key", "128")),
    ("unknown job id", lambda c, _: c.GetJob(pb.GetJobRequest(job_id="job-nope")), NOT_FOUND, ("job-nope",)),
    ("cancel an unknown job", lambda c, _: c.CancelJob(pb.CancelJobRequest(job_id="job-gone")), NOT_FOUND,
     ("job-gone",)),
    ("watch an unknown job", lambda c, _: list(c.WatchJob(pb.WatchJobRequest(job_id="job-ghost"))), NOT_FOUND,
     ("job-ghost",)),
    ("bad page token", lambda c, _: c.ListJobs(pb.ListJobsRequest(page_token="not-a-token")), INVALID,
     ("page_token", "not-a-token")),
    ("negative page size", lambda c, _: c.ListJobs(pb.ListJobsRequest(page_size=-3)), INVALID, ("page_size", "-3")),
    ("unspecified state filter", lambda c, _: c.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_UNSPECIFIED])),
     INVALID, ("states[0]", "JOB_STATE_UNSPECIFIED", "QUEUED")),
    ("unknown model source", lambda c, _: c.ListModels(pb.ListModelsRequest(source="pypi")), INVALID,
     ("source", "pypi", "torchvision")),
    ("describe an unknown architecture", lambda c, _: c.DescribeModel(pb.DescribeModelRequest(architecture="vgg99")),
     INVALID, ("architecture", "vgg99")),
    ("describe with a freeze depth too large",
     lambda c, _: c.DescribeModel(pb.DescribeModelRequest(architecture="resnet18", freeze=pb.FreezeSpec(depth=42))),
     INVALID, ("freeze.depth", "42", "allowed 0..9")),
    ("describe with a negative image size",
     lambda c, _: c.DescribeModel(pb.DescribeModelRequest(architecture="resnet18", image_size=-5)), INVALID,
     ("image_size", "-5")),
    ("predict with serving disabled",
     lambda _c, ch: pb_grpc.InferenceStub(ch).Predict(pb.PredictRequest(model="m", images=[b"x"])), PRECONDITION,
     ("serving is disabled", "TUNESERVE_TORCHSERVE_ENABLED")),
    ("serve a job with serving disabled", lambda c, _: c.ServeJob(pb.ServeJobRequest(job_id="job-1")), PRECONDITION,
     ("serving is disabled",)),
]  # fmt: skip


@pytest.mark.parametrize(("call", "code", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_request_gets_its_status_and_a_message_naming_the_problem(
    channel: grpc.Channel, call: Call, code: grpc.StatusCode, fragments: tuple[str, ...]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub(channel), channel)
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_on_a_machine_without_it_is_a_failed_precondition(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        create(training={"device": "cuda"})(stub(channel), channel)
    assert caught.value.code() == PRECONDITION
    assert "spec.training.device" in caught.value.details() and "'cuda'" in caught.value.details()


def test_an_idempotency_key_reused_with_another_spec_is_already_exists(channel: grpc.Channel) -> None:
    client = stub(channel)
    first = client.CreateJob(pb.CreateJobRequest(spec=spec("keyed"), idempotency_key="same-key"))
    client.CancelJob(pb.CancelJobRequest(job_id=first.id))
    with pytest.raises(grpc.RpcError) as caught:
        client.CreateJob(pb.CreateJobRequest(spec=spec("keyed", training={"epochs": 2}), idempotency_key="same-key"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "same-key" in caught.value.details() and first.id in caught.value.details()


def test_cancelling_a_finished_job_is_a_failed_precondition(channel: grpc.Channel) -> None:
    client = stub(channel)
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("finished")))
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    wait_state(client, job.id, (pb.CANCELLED,))  # at once if still queued, else once its worker stopped
    with pytest.raises(grpc.RpcError) as caught:
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert caught.value.code() == PRECONDITION
    assert job.id in caught.value.details() and "already CANCELLED" in caught.value.details()
