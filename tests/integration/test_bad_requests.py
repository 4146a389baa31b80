"""Bad requests: each gets its status code and a message naming the field and the bad value."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
import torchvision
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


def rpc(method: str, request: Any) -> Call:
    return lambda client, _ch: getattr(client, method)(request)


def watch(job_id: str) -> Call:
    return lambda client, _ch: list(client.WatchJob(pb.WatchJobRequest(job_id=job_id)))


def predict(request: pb.PredictRequest) -> Call:
    return lambda _client, ch: pb_grpc.InferenceStub(ch).Predict(request)


def case(name: str, call: Call, code: grpc.StatusCode, *fragments: str) -> Any:
    return pytest.param(call, code, fragments, id=name)


RESNET = {"architecture": "resnet18"}
CASES = [
    case(
        "unknown architecture",
        create(model={"architecture": "resnet1800"}),
        INVALID,
        "spec.model.architecture",
        "resnet1800",
        "did you mean",
        "tuneserve models",
    ),
    case(
        "freeze depth too large",
        create(freeze={"depth": 99}),
        INVALID,
        "spec.freeze.depth",
        "99",
        "allowed 0..",
    ),
    case(
        "freeze until an unknown layer",
        create(freeze={"until_layer": "layer9"}),
        INVALID,
        "spec.freeze.until_layer",
        "layer9",
    ),
    case(
        "freeze depth and until_layer together",
        create(freeze={"depth": 1, "until_layer": "features.0"}),
        INVALID,
        "spec.freeze",
        "give one of them",
    ),
    case("negative freeze depth", create(freeze={"depth": -1}), INVALID, "spec.freeze.depth", "-1"),
    case(
        "dataset path escaping with ..",
        create(data={"path": "../outside"}),
        INVALID,
        "spec.data.path",
        "../outside",
        "outside the data root",
    ),
    case(
        "absolute dataset path outside the root",
        create(data={"path": "/etc"}),
        INVALID,
        "spec.data.path",
        "/etc",
        "outside the data root",
    ),
    case(
        "missing dataset",
        create(data={"path": "nowhere"}),
        INVALID,
        "spec.data.path",
        "nowhere",
        "does not exist",
    ),
    case(
        "class folder without images",
        create(data={"path": "hollow"}),
        INVALID,
        "spec.data.path",
        "class_1",
        "no usable images",
    ),
    case(
        "single class", create(data={"path": "one"}), INVALID, "spec.data.path", "single class", "at least 2"
    ),
    case(
        "binary task with three classes",
        create(task="binary", data={"path": "three"}),
        INVALID,
        "spec.data.path",
        "binary",
        "exactly 2",
    ),
    case(
        "validation folder outside the root",
        create(data={"val_path": "../outside"}),
        INVALID,
        "spec.data.val_path",
        "../outside",
    ),
    case(
        "validation fraction above 1",
        create(data={"val_fraction": 1.5}),
        INVALID,
        "spec.data.val_fraction",
        "1.5",
    ),
    case(
        "unknown optimizer",
        create(training={"optimizer": "adagrad"}),
        INVALID,
        "spec.training.optimizer",
        "adagrad",
        "'sgd'",
    ),
    case("negative learning rate", create(training={"lr": -0.1}), INVALID, "spec.training.lr", "-0.1"),
    case("zero epochs", create(training={"epochs": 0}), INVALID, "spec.training.epochs", "0"),
    case(
        "image size too small", create(training={"image_size": 8}), INVALID, "spec.training.image_size", "8"
    ),
    case("bad job name", create("bad name!"), INVALID, "spec.name", "bad name!"),
    case("job name with ..", create("a..b"), INVALID, "spec.name", "a..b"),
    case("missing model", create_raw(without("model")), INVALID, "spec.model", "Field required"),
    case("missing job name", create_raw(spec("")), INVALID, "spec.name", "Field required"),
    case(
        "weights_file without weights=file",
        create(model={"weights_file": "/tmp/w.pt"}),
        INVALID,
        "spec.model",
        "weights_file",
        "weights='file'",
    ),
    case(
        "weights=file without a file",
        create(model={"weights": "file"}),
        INVALID,
        "spec.model",
        "weights='file' needs model.weights_file",
    ),
    case(
        "unknown weights name",
        create(model={**RESNET, "weights": "IMAGENET9K"}),
        INVALID,
        "spec.model.weights",
        "IMAGENET9K",
        "IMAGENET1K_V1",
    ),
    case(
        "missing pretrained weights",
        create(model={**RESNET, "weights": "DEFAULT"}),
        PRECONDITION,
        "spec.model.weights",
        "resnet18-f37072fd.pth",
        "make weights MODELS=resnet18",
    ),
    case(
        "missing weights file under the weights root",
        create(model={"weights": "file", "weights_file": "nope/w.pt"}),
        PRECONDITION,
        "spec.model.weights_file",
        "nope/w.pt",
        "does not exist",
    ),
    case(
        "gpus for a cpu job",
        create(resources={"gpus": 1}),  # spec() trains on the cpu
        INVALID,
        "resources.gpus 1 with training.device 'cpu'",
    ),
    case(
        "cuda without gpus",
        create(training={"device": "cuda"}, resources={"gpus": 0}),
        INVALID,
        "training.device 'cuda' with resources.gpus 0",
    ),
    case("negative gpus", create(resources={"gpus": -1}), INVALID, "spec.resources.gpus", "-1"),
    case(
        "a global batch that does not divide by the world size",
        create(training={"batch_size": 8}, resources={"processes_per_node": 3}),
        INVALID,
        "training.batch_size 8",
        "world size 3",
        "multiple of 3",
    ),
    case(
        "gpus and gpus_per_node that disagree",
        create(training={"device": "auto"}, resources={"gpus": 1, "gpus_per_node": 2}),
        INVALID,
        "resources.gpus 1 and resources.gpus_per_node 2",
    ),
    case(
        "gpus_per_node for a cpu job (gpus' alias)",
        create(resources={"gpus_per_node": 1}),
        INVALID,
        "resources.gpus 1 with training.device 'cpu'",
    ),
    case(
        "several nodes without a Kubernetes launcher",
        create(resources={"nodes": 2, "processes_per_node": 1}),
        PRECONDITION,
        "spec.resources.nodes",
        "resources.nodes 2",
        "no Kubernetes launcher",
        "resources.nodes 1",
    ),
    case("multilabel without a manifest", create(task="multilabel"), INVALID, "data.manifest", "multilabel"),
    case(
        "manifest for a multiclass task",
        create(data={"manifest": "m.csv"}),
        INVALID,
        "data.manifest",
        "multiclass",
    ),
    case(
        "label smoothing on a binary task",
        create(task="binary", training={"label_smoothing": 0.1}),
        INVALID,
        "training.label_smoothing",
        "multiclass",
    ),
    case(
        "unknown wandb mode",
        create(logging={"wandb": {"mode": "sometimes"}}),
        INVALID,
        "spec.logging.wandb.mode",
        "sometimes",
    ),
    case(
        "serving model name with a slash",
        create(serving={"model_name": "a/b"}),
        INVALID,
        "spec.serving.model_name",
        "a/b",
    ),
    case("idempotency key too long", create_raw(spec(), "k" * 300), INVALID, "idempotency_key", "128"),
    case("unknown job id", rpc("GetJob", pb.GetJobRequest(job_id="job-nope")), NOT_FOUND, "job-nope"),
    case(
        "cancel an unknown job",
        rpc("CancelJob", pb.CancelJobRequest(job_id="job-gone")),
        NOT_FOUND,
        "job-gone",
    ),
    case("watch an unknown job", watch("job-ghost"), NOT_FOUND, "job-ghost"),
    case(
        "bad page token",
        rpc("ListJobs", pb.ListJobsRequest(page_token="not-a-token")),
        INVALID,
        "page_token",
        "not-a-token",
    ),
    case("negative page size", rpc("ListJobs", pb.ListJobsRequest(page_size=-3)), INVALID, "page_size", "-3"),
    case(
        "unspecified state filter",
        rpc("ListJobs", pb.ListJobsRequest(states=[pb.JOB_STATE_UNSPECIFIED])),
        INVALID,
        "states[0]",
        "JOB_STATE_UNSPECIFIED",
        "QUEUED",
    ),
    case(
        "unknown model source",
        rpc("ListModels", pb.ListModelsRequest(source="pypi")),
        INVALID,
        "source",
        "pypi",
        "torchvision",
    ),
    case(
        "describe an unknown architecture",
        rpc("DescribeModel", pb.DescribeModelRequest(architecture="vgg99")),
        INVALID,
        "architecture",
        "vgg99",
    ),
    case(
        "describe with a freeze depth too large",
        rpc(
            "DescribeModel", pb.DescribeModelRequest(architecture="resnet18", freeze=pb.FreezeSpec(depth=42))
        ),
        INVALID,
        "freeze.depth",
        "42",
        "allowed 0..9",
    ),
    case(
        "describe with a negative image size",
        rpc("DescribeModel", pb.DescribeModelRequest(architecture="resnet18", image_size=-5)),
        INVALID,
        "image_size",
        "-5",
    ),
    case(
        "describe with an image size over the cap",
        rpc("DescribeModel", pb.DescribeModelRequest(architecture="resnet18", image_size=100_000)),
        INVALID,
        "image_size",
        "100000",
        "16..1024",
    ),
    case(
        "describe with a head too large to build",
        rpc("DescribeModel", pb.DescribeModelRequest(architecture="resnet18", num_classes=2_000_000_000)),
        INVALID,
        "num_classes",
        "2000000000",
        "1..100000",
    ),
    case(
        "predict with serving disabled",
        predict(pb.PredictRequest(model="m", images=[b"x"])),
        PRECONDITION,
        "serving is disabled",
        "TUNESERVE_TORCHSERVE_ENABLED",
    ),
    case(
        "serve a job with serving disabled",
        rpc("ServeJob", pb.ServeJobRequest(job_id="job-1")),
        PRECONDITION,
        "serving is disabled",
    ),
]


@pytest.mark.parametrize(("call", "code", "fragments"), CASES)
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
        client.CreateJob(
            pb.CreateJobRequest(spec=spec("keyed", training={"epochs": 2}), idempotency_key="same-key")
        )
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


OUTSIDE_WEIGHTS = {
    "an absolute path to a file that exists": "/etc/passwd",
    "an absolute path to nothing": "/etc/no-such-weights.pt",
    "a relative path climbing out": "../../../../../../etc/passwd",
    "a symlink inside the root to a file outside": "escape.pt",
    "a path through a symlinked folder leading outside": "etc-link/passwd",
}


@pytest.mark.parametrize("weights_file", OUTSIDE_WEIGHTS.values(), ids=OUTSIDE_WEIGHTS.keys())
def test_a_weights_file_outside_the_weights_root_is_invalid_and_its_existence_is_not_told(
    service: Service, channel: grpc.Channel, weights_file: str
) -> None:
    root = service.settings.weights_dir
    for link, target in (("escape.pt", "/etc/passwd"), ("etc-link", "/etc")):
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)
    client = stub(channel)
    before = len(client.ListJobs(pb.ListJobsRequest(page_size=500)).jobs)
    with pytest.raises(grpc.RpcError) as caught:
        create("peek", model={"weights": "file", "weights_file": weights_file})(client, channel)
    details = caught.value.details()
    assert caught.value.code() == INVALID, details
    assert f"spec.model.weights_file {weights_file!r} is outside the weights root {root.resolve()}" in details
    # The same words whether or not the file is there: nothing to tell /etc/passwd from a missing file.
    assert details.replace(repr(weights_file), "X") == _outside_message(channel, "/etc/no-such-weights.pt")
    assert "exist" not in details and "root:" not in details  # no existence, no file contents
    assert len(client.ListJobs(pb.ListJobsRequest(page_size=500)).jobs) == before  # no job was created


def _outside_message(channel: grpc.Channel, weights_file: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        create("peek", model={"weights": "file", "weights_file": weights_file})(stub(channel), channel)
    return caught.value.details().replace(repr(weights_file), "X")


def test_a_weights_file_under_the_weights_root_given_relative_is_accepted(
    service: Service, channel: grpc.Channel
) -> None:
    folder = service.settings.weights_dir / "mine"
    folder.mkdir(exist_ok=True)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=2).state_dict(), folder / "small.pt")
    client = stub(channel)
    job = client.CreateJob(
        pb.CreateJobRequest(
            spec=spec("own-weights", model={"weights": "file", "weights_file": "mine/small.pt"})
        )
    )
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert job.spec.model.weights_file == "mine/small.pt"


@pytest.fixture(scope="module")
def two_gpu_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service on a machine with 2 GPUs (TUNESERVE_GPU_COUNT), the last kept for serving only."""
    root = tmp_path_factory.mktemp("gpus")
    settings = make_settings(root, gpu_count=2, train_on_serving_gpus=False)
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        yield running


def test_a_job_asking_more_gpus_than_the_service_trains_on_is_resource_exhausted(
    two_gpu_service: Service,
) -> None:
    with channel_to(two_gpu_service) as channel, pytest.raises(grpc.RpcError) as caught:
        create(training={"device": "auto"}, resources={"gpus": 2})(stub(channel), channel)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert caught.value.details() == (
        "spec.resources.gpus 2 is more than the 1 GPU(s) this service trains on (it has 2; GPU(s) [1] are "
        "reserved for serving (TUNESERVE_SERVING_GPUS) and TUNESERVE_TRAIN_ON_SERVING_GPUS is false); "
        "ask for at most 1, or 0 to train on the CPU"
    )


def test_the_default_gpu_request_is_recorded_and_a_repeated_request_gets_the_same_job(
    two_gpu_service: Service,
) -> None:
    auto = {"device": "auto", "epochs": 1, "batch_size": 4, "image_size": 32}
    with channel_to(two_gpu_service) as channel:
        client = stub(channel)
        request = pb.CreateJobRequest(spec=spec("gpu-default", training=auto), idempotency_key="gpu-1")
        first = client.CreateJob(request)
        client.CancelJob(pb.CancelJobRequest(job_id=first.id))
        again = client.CreateJob(request)  # gpus unset again: the same request, not a different spec
        cpu = client.CreateJob(pb.CreateJobRequest(spec=spec("cpu-default")))  # training.device cpu
        client.CancelJob(pb.CancelJobRequest(job_id=cpu.id))
    assert first.spec.resources.HasField("gpus") and first.spec.resources.gpus == 1
    assert again.id == first.id
    assert cpu.spec.resources.HasField("gpus") and cpu.spec.resources.gpus == 0
