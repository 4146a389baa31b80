"""Limits: message size, queued jobs and open watches each end in RESOURCE_EXHAUSTED, with the setting named.

The scheduler is stopped after start-up, so created jobs stay QUEUED and the queue count is exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from harness import make_image_folder, make_settings, running_service, spec
from reliability import record

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

MAX_MESSAGE = 64 * 1024
MAX_QUEUED = 2
GRPC_WORKERS = 6  # the manager keeps 4 threads free of watches: 2 WatchJob streams at most
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = make_settings(
        tmp_path_factory.mktemp("limits"),
        max_message_bytes=MAX_MESSAGE,
        max_queued_jobs=MAX_QUEUED,
        grpc_workers=GRPC_WORKERS,
    )
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        running.scheduler.stop(drain=False)
        yield running


@pytest.fixture
def client(service: Service) -> Iterator[pb_grpc.FineTuningStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc.FineTuningStub(channel)
    for job in service.store.list_jobs([], 500)[0]:  # leave an empty queue to the next test
        if not job.state.is_final:
            service.store.request_cancel(job.id)


def test_a_predict_request_over_the_message_limit_is_resource_exhausted(service: Service) -> None:
    with (
        grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.InferenceStub(channel).Predict(
            pb.PredictRequest(model="m", images=[b"\0" * (MAX_MESSAGE + 1)])
        )
    assert caught.value.code() == EXHAUSTED
    assert str(MAX_MESSAGE) in caught.value.details()  # grpc names the limit it applied
    record(
        "request",
        "a request over TUNESERVE_MAX_MESSAGE_BYTES (a 64 KiB + 1 image)",
        1,
        "RESOURCE_EXHAUSTED naming the limit, before any handler runs",
    )


def test_a_request_just_under_the_message_limit_is_handled(service: Service) -> None:
    with (
        grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.InferenceStub(channel).Predict(
            pb.PredictRequest(model="m", images=[b"\0" * (MAX_MESSAGE - 64)])
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # reached the servicer: serving is off


def test_a_job_past_the_queue_limit_is_resource_exhausted_naming_the_setting(
    client: pb_grpc.FineTuningStub,
) -> None:
    queued = [client.CreateJob(pb.CreateJobRequest(spec=spec(f"q{i}"))) for i in range(MAX_QUEUED)]
    with pytest.raises(grpc.RpcError) as caught:
        client.CreateJob(pb.CreateJobRequest(spec=spec("one-too-many")))
    assert caught.value.code() == EXHAUSTED
    assert f"{MAX_QUEUED} jobs are already queued" in caught.value.details()
    assert "TUNESERVE_MAX_QUEUED_JOBS" in caught.value.details()
    client.CancelJob(pb.CancelJobRequest(job_id=queued[0].id))
    assert client.CreateJob(pb.CreateJobRequest(spec=spec("room-again"))).state == pb.QUEUED
    record(
        "request",
        f"CreateJob past TUNESERVE_MAX_QUEUED_JOBS ({MAX_QUEUED})",
        1,
        "RESOURCE_EXHAUSTED naming the setting; accepted again once a queued job is cancelled",
    )


def test_a_watch_past_the_stream_limit_is_resource_exhausted(client: pb_grpc.FineTuningStub) -> None:
    jobs = [client.CreateJob(pb.CreateJobRequest(spec=spec(f"w{i}"))) for i in range(MAX_QUEUED)]
    streams = [client.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30) for job in jobs]
    try:
        assert [next(s).seq for s in streams] == [1, 1]  # both open, each holding a server thread
        with pytest.raises(grpc.RpcError) as caught:
            next(client.WatchJob(pb.WatchJobRequest(job_id=jobs[0].id), timeout=30))
        assert caught.value.code() == EXHAUSTED
        assert "too many WatchJob streams" in caught.value.details()
    finally:
        for stream in streams:
            stream.cancel()
    record(
        "request",
        "a WatchJob past the open-stream limit (TUNESERVE_GRPC_WORKERS - 4)",
        1,
        "RESOURCE_EXHAUSTED with the fix (poll GetJob, or more workers)",
    )
