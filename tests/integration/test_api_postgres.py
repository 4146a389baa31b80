"""The whole service with its job store on a real PostgreSQL (tests/pg.py): a tiny job trained to the end
through the gRPC API on loopback, watched and resumed by sequence number, idempotency and cancel, and
the jobs still there for a service started again on the same database; the database stopped mid-job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import (
    all_events,
    channel_to,
    make_image_folder,
    make_settings,
    running_service,
    spec,
    stub,
    wait_event,
    wait_state,
)

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.errors import Unavailable
from tests.pg import postgres_of_its_own

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_a_job_runs_end_to_end_with_the_store_on_postgres(tmp_path: Path, postgres_database: str) -> None:
    settings = make_settings(tmp_path, database_url=postgres_database)
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as service, channel_to(service) as channel:
        assert service.store.display_url.startswith("postgresql://postgres:***@127.0.0.1:")
        assert not settings.jobs_db.exists()  # nothing went to the SQLite file
        client = stub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("pg"), idempotency_key="pg-1"))
        done = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED), timeout=240)
        assert done.state == pb.SUCCEEDED, done.error
        events = all_events(client, job.id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert all_events(client, job.id, after_seq=3) == events[3:]
        again = client.CreateJob(pb.CreateJobRequest(spec=spec("pg"), idempotency_key="pg-1"))
        assert again.id == job.id
        queued = client.CreateJob(pb.CreateJobRequest(spec=spec("to-cancel", training={"epochs": 500})))
        assert client.CancelJob(pb.CancelJobRequest(job_id=queued.id)).cancel_requested
        wait_state(client, queued.id, (pb.CANCELLED,))
    with running_service(settings) as service, channel_to(service) as channel:
        listed = stub(channel).ListJobs(pb.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [queued.id, job.id]


def test_postgres_down_mid_job_loses_no_report_and_the_job_finishes(tmp_path: Path) -> None:
    """The database stops for a few seconds while a job trains: the worker's reports are retried (the
    store answers UNAVAILABLE meanwhile) and every epoch is recorded once it is back."""
    with postgres_of_its_own() as server:
        settings = make_settings(tmp_path, database_url=server.create_database("jobs"))
        make_image_folder(settings.data_root / "ds")
        epochs = 6
        with running_service(settings) as service, channel_to(service) as channel:
            client = stub(channel)
            job = client.CreateJob(pb.CreateJobRequest(spec=spec("outage", training={"epochs": epochs})))
            wait_event(client, job.id, "EPOCH", timeout=120)
            server.stop()
            with pytest.raises(Unavailable):
                service.store.get_job(job.id)
            time.sleep(3)
            server.start()
            done = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
            assert done.state == pb.SUCCEEDED, done.error
            events = all_events(client, job.id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        seen = [int(e.data["epoch"]) for e in events if e.kind == "EPOCH"]
        assert len(seen) == len(set(seen)) == epochs  # every epoch once: none lost, none repeated
