"""GetJob and ListJobs through a real server: messages are cached per version of a job, and a write is
seen by the very next read (service.api.convert, service.jobs.store_codec.JobVersions)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import channel_to, make_image_folder, make_settings, running_service, spec, stub, wait_state

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = make_settings(tmp_path_factory.mktemp("reads"))
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[pb_grpc.FineTuningStub]:
    with channel_to(service) as channel:
        yield stub(channel)


def listed(client: pb_grpc.FineTuningStub, job_id: str) -> pb.Job:
    page = client.ListJobs(pb.ListJobsRequest(page_size=500))
    return next(j for j in page.jobs if j.id == job_id)


def test_a_cancel_is_seen_by_the_next_get_job_and_list_jobs(client: pb_grpc.FineTuningStub) -> None:
    # one job at a time (make_settings): the first job takes the slot, the second stays queued
    blocker = client.CreateJob(pb.CreateJobRequest(spec=spec("blocker", training={"epochs": 500})))
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("read-twice")))
    for _ in range(3):  # read it several times, so its message is cached
        assert client.GetJob(pb.GetJobRequest(job_id=job.id)).state == pb.QUEUED
        assert listed(client, job.id).state == pb.QUEUED
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    got = client.GetJob(pb.GetJobRequest(job_id=job.id))
    assert (got.state, got.cancel_requested) == (pb.CANCELLED, True)
    assert (listed(client, job.id).state, listed(client, job.id).cancel_requested) == (pb.CANCELLED, True)
    client.CancelJob(pb.CancelJobRequest(job_id=blocker.id))
    wait_state(client, blocker.id, (pb.CANCELLED,))
    assert listed(client, blocker.id).state == pb.CANCELLED


def test_a_result_written_is_seen_by_the_next_get_job_and_list_jobs(
    service: Service, client: pb_grpc.FineTuningStub
) -> None:
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("result")))
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    wait_state(client, job.id, (pb.CANCELLED,))
    for value in (0.25, 0.5):
        client.GetJob(pb.GetJobRequest(job_id=job.id))  # cache the version before the write
        service.store.update_result(job.id, best_metric=value, metrics={"val_acc": value})
        got = client.GetJob(pb.GetJobRequest(job_id=job.id))
        assert (got.result.best_metric, got.result.metrics["val_acc"]) == (value, value)
        assert listed(client, job.id).result.best_metric == value


def test_each_job_in_a_page_is_its_own(client: pb_grpc.FineTuningStub) -> None:
    ids = []
    for i in range(3):
        job = client.CreateJob(pb.CreateJobRequest(spec=spec(f"page-{i}")))
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
        ids.append(job.id)
    page = client.ListJobs(pb.ListJobsRequest(page_size=2))
    assert [(j.id, j.spec.name) for j in page.jobs] == [(ids[2], "page-2"), (ids[1], "page-1")]
    assert page.next_page_token
    for job in page.jobs:
        assert client.GetJob(pb.GetJobRequest(job_id=job.id)) == job
