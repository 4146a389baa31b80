"""Every RPC against a real server on loopback, over a real channel (serving: test_api_serving.py)."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from harness import (
    all_events,
    channel_to,
    make_image_folder,
    make_settings,
    running_service,
    spec,
    stub,
    wait_event,
    wait_for,
    wait_state,
)

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.api.interceptors import ErrorInterceptor
from service.app import Service

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("api")
    settings = make_settings(root)
    make_image_folder(settings.data_root / "ds")
    # an (empty) file where torchvision looks for resnet18's ImageNet weights: "available" to ListModels
    weights = settings.torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    weights.touch()
    with running_service(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[pb_grpc.FineTuningStub]:
    with channel_to(service) as channel:
        yield stub(channel)


@pytest.fixture(scope="module")
def trained(client: pb_grpc.FineTuningStub) -> dict[str, Any]:
    """One tiny job trained to the end, watched live for 3 events, then again from seq 3 after a reconnect."""
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("trained"), idempotency_key="trained-1"))
    first = []
    stream = client.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120)
    for event in stream:
        first.append(event)
        if len(first) == 3:
            break
    stream.cancel()  # the client goes away mid-job
    rest = list(client.WatchJob(pb.WatchJobRequest(job_id=job.id, after_seq=first[-1].seq), timeout=180))
    return {
        "created": job,
        "first": first,
        "rest": rest,
        "final": client.GetJob(pb.GetJobRequest(job_id=job.id)),
    }


def test_create_job_returns_a_queued_job_with_its_spec_and_defaults(trained: dict[str, Any]) -> None:
    job = trained["created"]
    assert job.id.startswith("job-") and job.state == pb.QUEUED
    assert job.spec.name == "trained" and job.idempotency_key == "trained-1"
    assert job.spec.training.optimizer == "adamw"  # a default filled in
    assert job.spec.training.image_size == 32 and job.created_at.seconds > 0


def test_a_tiny_job_trains_packages_and_succeeds(trained: dict[str, Any]) -> None:
    final = trained["final"]
    assert final.state == pb.SUCCEEDED, final.error
    assert final.attempts == 1 and final.result.epochs_completed == 1
    assert final.result.archive_path.endswith("trained-v1.mar") and len(final.result.archive_sha256) == 64
    assert Path(final.result.archive_path).is_file()
    assert set(final.result.class_names) == {"class_0", "class_1"}


def test_watch_resumed_from_a_sequence_number_misses_and_repeats_nothing(
    client: pb_grpc.FineTuningStub, trained: dict[str, Any]
) -> None:
    watched = trained["first"] + trained["rest"]
    everything = all_events(client, trained["created"].id)
    assert [e.seq for e in watched] == list(range(1, len(everything) + 1))
    assert [(e.seq, e.kind, e.message) for e in watched] == [(e.seq, e.kind, e.message) for e in everything]


def test_watch_streams_the_lifecycle_and_ends_after_the_final_state(trained: dict[str, Any]) -> None:
    events = trained["first"] + trained["rest"]
    states = [e.data["state"] for e in events if e.kind == "STATE"]
    assert states == ["QUEUED", "RUNNING", "PACKAGING", "SUCCEEDED"]
    assert {"EPOCH", "CHECKPOINT", "PACKAGED"} <= {e.kind for e in events}
    assert events[-1].kind == "STATE" and events[-1].state == pb.SUCCEEDED
    epoch = next(e for e in events if e.kind == "EPOCH")
    assert epoch.state == pb.RUNNING and "val_loss" in epoch.data


def test_the_same_idempotency_key_returns_the_same_job(
    client: pb_grpc.FineTuningStub, trained: dict[str, Any]
) -> None:
    again = client.CreateJob(pb.CreateJobRequest(spec=spec("trained"), idempotency_key="trained-1"))
    assert again.id == trained["created"].id and again.state == pb.SUCCEEDED


def test_cancel_of_a_queued_job_cancels_it_at_once(
    client: pb_grpc.FineTuningStub, trained: dict[str, Any]
) -> None:
    blocker = client.CreateJob(pb.CreateJobRequest(spec=spec("blocker", training={"epochs": 500})))
    queued = client.CreateJob(pb.CreateJobRequest(spec=spec("queued")))
    cancelled = client.CancelJob(pb.CancelJobRequest(job_id=queued.id))
    client.CancelJob(pb.CancelJobRequest(job_id=blocker.id))
    assert (cancelled.state, cancelled.cancel_requested) == (pb.CANCELLED, True)
    assert all_events(client, queued.id)[-1].message == "QUEUED -> CANCELLED: cancelled by request"
    wait_state(client, blocker.id, (pb.CANCELLED,))


def test_cancel_of_a_running_job_stops_its_worker_at_a_safe_point(
    client: pb_grpc.FineTuningStub, trained: dict[str, Any]
) -> None:
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("long", training={"epochs": 500})))
    wait_event(client, job.id, "PROGRESS", timeout=180)
    marked = client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    assert marked.cancel_requested and marked.state in (pb.RUNNING, pb.CANCELLED)
    final = wait_state(client, job.id, (pb.CANCELLED, pb.FAILED, pb.SUCCEEDED), timeout=60)
    assert final.state == pb.CANCELLED
    messages = [e.message for e in all_events(client, job.id)]
    assert any("training stopped (cancelled)" in m for m in messages)


def test_a_watcher_that_goes_away_frees_its_stream(
    service: Service, client: pb_grpc.FineTuningStub, trained: dict[str, Any]
) -> None:
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("watched", training={"epochs": 500})))
    stream = client.WatchJob(pb.WatchJobRequest(job_id=job.id))
    assert next(stream).seq == 1
    assert service.server.jobs.open_watches() == 1
    stream.cancel()
    wait_for(lambda: service.server.jobs.open_watches() == 0, timeout=10, what="the watch to close")
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    wait_state(client, job.id, (pb.CANCELLED,))


def test_list_jobs_pages_newest_first_and_filters_by_state(
    client: pb_grpc.FineTuningStub, trained: dict[str, Any]
) -> None:
    ids = []
    for i in range(5):
        job = client.CreateJob(pb.CreateJobRequest(spec=spec(f"listed-{i}")))
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
        ids.append(job.id)
    seen, token = [], ""
    while True:
        page = client.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert [i for i in seen if i in ids] == ids[::-1]
    assert seen.index(ids[0]) < seen.index(trained["created"].id)  # newer before older
    succeeded = client.ListJobs(pb.ListJobsRequest(states=[pb.SUCCEEDED], page_size=500))
    assert trained["created"].id in [j.id for j in succeeded.jobs]
    assert all(j.state == pb.SUCCEEDED for j in succeeded.jobs)


def test_list_models_says_which_weights_are_on_this_machine(client: pb_grpc.FineTuningStub) -> None:
    models = {m.architecture: m for m in client.ListModels(pb.ListModelsRequest(source="torchvision")).models}
    resnet18 = {w.name: w for w in models["resnet18"].weights}
    assert resnet18["IMAGENET1K_V1"].available and resnet18["IMAGENET1K_V1"].is_default
    mobilenet = models["mobilenet_v3_small"].weights[0]
    assert not mobilenet.available and "make weights MODELS=mobilenet_v3_small" in mobilenet.fetch_command
    available = client.ListModels(pb.ListModelsRequest(source="torchvision", available_only=True)).models
    assert [m.architecture for m in available] == ["resnet18"]


def test_describe_model_shows_the_layer_table_and_what_a_freeze_freezes(
    client: pb_grpc.FineTuningStub,
) -> None:
    request = pb.DescribeModelRequest(
        architecture="resnet18", image_size=64, num_classes=3, freeze=pb.FreezeSpec(depth=5)
    )
    described = client.DescribeModel(request)
    names = [row.name for row in described.layers]
    assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1"] and names[-1] == "fc"
    assert [row.frozen for row in described.layers] == [True] * 5 + [False] * (len(names) - 5)
    assert described.layers[-1].is_head and list(described.layers[-1].output_shape) == [1, 3]
    assert described.frozen_params + described.trainable_params == described.total_params
    assert described.freezable_blocks == len(names) - 1


def test_the_builtin_lite0_is_listed_and_described_as_the_tf_network(client: pb_grpc.FineTuningStub) -> None:
    (builtin,) = client.ListModels(pb.ListModelsRequest(source="builtin")).models
    assert builtin.architecture == "tf_efficientnet_lite0" and builtin.weights[0].available
    request = pb.DescribeModelRequest(architecture="efficientnet_lite0", image_size=64)  # the old name
    described = client.DescribeModel(request)
    assert described.architecture == "tf_efficientnet_lite0"
    assert (described.layers[0].name, described.layers[0].type) == ("conv_stem", "Conv2dSame")


def test_health_reports_each_service(service: Service) -> None:
    with channel_to(service) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = {
            name: health.Check(health_pb2.HealthCheckRequest(service=name)).status
            for name in ("", "tuneserve.v1.FineTuning", "tuneserve.v1.Inference")
        }
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert status == {"": serving, "tuneserve.v1.FineTuning": serving, "tuneserve.v1.Inference": not_serving}


def test_reflection_lists_the_services(service: Service) -> None:
    with channel_to(service) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        file = database.FindFileContainingSymbol("tuneserve.v1.FineTuning")
    assert {"tuneserve.v1.FineTuning", "tuneserve.v1.Inference", "grpc.health.v1.Health"} <= set(services)
    fine_tuning = next(s for s in file.service if s.name == "FineTuning")
    assert {"CreateJob", "WatchJob", "DescribeModel"} <= {m.name for m in fine_tuning.method}


# ---------------------------------------------------------------------- unexpected errors


class Exploding(pb_grpc.InferenceServicer, pb_grpc.FineTuningServicer):
    """A servicer with a bug: each method raises an exception that is no domain error."""

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        raise RuntimeError("secret internals /etc/passwd")

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        yield pb.JobEvent(job_id=request.job_id, seq=1, kind="INFO")
        raise RuntimeError("secret internals /etc/passwd")


@pytest.fixture(scope="module")
def exploding_channel() -> Iterator[grpc.Channel]:
    """A real server with the service's ErrorInterceptor in front of the Exploding servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor()])
    pb_grpc.add_InferenceServicer_to_server(Exploding(), server)
    pb_grpc.add_FineTuningServicer_to_server(Exploding(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(None)


@pytest.mark.parametrize("method", ["Predict", "WatchJob"])
def test_an_unexpected_error_is_internal_with_an_id_and_no_details(
    exploding_channel: grpc.Channel, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="service.api.interceptors"),
        pytest.raises(grpc.RpcError) as caught,
    ):
        if method == "Predict":
            pb_grpc.InferenceStub(exploding_channel).Predict(pb.PredictRequest(model="m", images=[b"x"]))
        else:
            list(stub(exploding_channel).WatchJob(pb.WatchJobRequest(job_id="job-x")))
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    error_id = re.fullmatch(r"internal error \(id ([0-9a-f]{8})\); the server log has the details", details)
    assert error_id, details
    assert "secret" not in details and "Traceback" not in details
    logged = [r for r in caplog.records if f"error id {error_id.group(1)}" in r.getMessage()]
    assert len(logged) == 1 and method in logged[0].getMessage()
    assert logged[0].exc_info and "secret internals" in str(logged[0].exc_info[1])  # the log has it all


# ---------------------------------------------------------------------- auth and TLS


@pytest.fixture(scope="module")
def auth_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = make_settings(tmp_path_factory.mktemp("auth"), auth_token="s3cret-token")
    with running_service(settings) as running:
        yield running


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)]
)
def test_auth_refuses_a_missing_or_wrong_token(
    auth_service: Service, metadata: tuple[tuple[str, str], ...]
) -> None:
    with channel_to(auth_service) as channel, pytest.raises(grpc.RpcError) as caught:
        stub(channel).ListJobs(pb.ListJobsRequest(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token" in caught.value.details().lower() or "bearer" in caught.value.details().lower()


def test_auth_refuses_streaming_calls_without_a_token(auth_service: Service) -> None:
    with channel_to(auth_service) as channel, pytest.raises(grpc.RpcError) as caught:
        list(stub(channel).WatchJob(pb.WatchJobRequest(job_id="job-x")))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_auth_lets_the_right_token_through(auth_service: Service) -> None:
    with channel_to(auth_service) as channel:
        jobs = stub(channel).ListJobs(
            pb.ListJobsRequest(), metadata=(("authorization", "Bearer s3cret-token"),)
        )
    assert list(jobs.jobs) == []


def test_health_stays_open_with_auth_on(auth_service: Service) -> None:
    with channel_to(auth_service) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_tls_serves_over_an_encrypted_channel(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    settings = make_settings(tmp_path, tls_cert=cert, tls_key=key)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with (
        running_service(settings) as running,
        grpc.secure_channel(f"localhost:{running.port}", credentials) as channel,
    ):
        jobs = stub(channel).ListJobs(pb.ListJobsRequest())
    assert list(jobs.jobs) == []
