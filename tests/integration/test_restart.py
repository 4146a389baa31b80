"""Durability: restarts lose nothing, interrupted jobs resume, a dying worker never takes the server down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    wait_for,
    wait_state,
)

from service.api import convert
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.jobs.store import JobStore
from service.records import EventKind, JobState
from service.settings import Settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path, max_job_retries=1)
    make_image_folder(settings.data_root / "ds")
    return settings


def test_jobs_and_events_are_all_there_after_a_restart(settings: Settings) -> None:
    with running_service(settings) as first, channel_to(first) as channel:
        client = stub(channel)
        running = client.CreateJob(pb.CreateJobRequest(spec=spec("running", training={"epochs": 500})))
        cancelled = client.CreateJob(pb.CreateJobRequest(spec=spec("cancelled"), idempotency_key="k1"))
        client.CancelJob(pb.CancelJobRequest(job_id=cancelled.id))
        wait_state(client, running.id, (pb.RUNNING,))
        before = {j: first.store.events_after(j) for j in (running.id, cancelled.id)}
        jobs_before = {j: client.GetJob(pb.GetJobRequest(job_id=j)) for j in (running.id, cancelled.id)}
    # stopped without draining: the running job's worker is killed and the job goes back to the queue
    with running_service(settings) as second, channel_to(second) as channel:
        client = stub(channel)
        listed = client.ListJobs(pb.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [cancelled.id, running.id]
        again = client.GetJob(pb.GetJobRequest(job_id=cancelled.id))
        assert again == jobs_before[cancelled.id]
        assert client.GetJob(pb.GetJobRequest(job_id=running.id)).spec == jobs_before[running.id].spec
        assert second.store.events_after(cancelled.id) == before[cancelled.id]
        after = second.store.events_after(running.id)
        assert after[: len(before[running.id])] == before[running.id]
        # the worker may still have reported (an epoch starting, a warning) between the snapshot and the
        # stop: the next state change is the re-queue
        requeue = next(e for e in after[len(before[running.id]) :] if e.kind == EventKind.STATE)
        assert requeue.data["state"] == "QUEUED"
        again_key = client.CreateJob(pb.CreateJobRequest(spec=spec("cancelled"), idempotency_key="k1"))
        assert again_key.id == cancelled.id
        client.CancelJob(pb.CancelJobRequest(job_id=running.id))
        wait_state(client, running.id, (pb.CANCELLED,))


def test_a_job_running_when_the_service_died_is_requeued_and_runs_again(settings: Settings) -> None:
    store = JobStore(settings.jobs_db)
    job = store.create_job(convert.spec_from_proto(spec("orphaned", training={"epochs": 500})))
    store.transition(job.id, JobState.RUNNING)  # the service died here, without a word
    store.close()
    with running_service(settings) as service, channel_to(service) as channel:
        client = stub(channel)
        wait_for(
            lambda: service.store.get_job(job.id).attempts == 1 and service.scheduler.running(),
            what="restart",
        )
        events = service.store.events_after(job.id)
        states = [e.data["state"] for e in events if e.kind == EventKind.STATE]
        assert states[:4] == ["QUEUED", "RUNNING", "QUEUED", "RUNNING"]
        assert any(
            "resumes from its last checkpoint" in e.message for e in events if e.kind == EventKind.INFO
        )
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
        wait_state(client, job.id, (pb.CANCELLED,))


def test_a_killed_worker_is_retried_then_the_job_fails_and_the_server_lives_on(settings: Settings) -> None:
    with running_service(settings) as service, channel_to(service) as channel:
        client = stub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("doomed", training={"epochs": 500})))
        for attempt in (1, 2):
            pid = wait_for(
                lambda a=attempt: (
                    service.store.get_job(job.id).attempts == a and service.store.worker_pid(job.id)
                ),
                what=f"worker of attempt {attempt}",
            )
            os.kill(pid, signal.SIGKILL)
        failed = wait_state(client, job.id, (pb.FAILED,))
        assert failed.error == "worker killed by SIGKILL (exit -9) (out of memory?), 2 attempts"
        warnings = [e.message for e in all_events(client, job.id) if e.kind == "WARNING"]
        assert any("retrying from the last checkpoint (attempt 2 of 2)" in w for w in warnings)
        assert client.ListJobs(pb.ListJobsRequest()).jobs[0].id == job.id  # the server still answers


EPOCHS = 30


@pytest.mark.slow
def test_a_drained_job_resumes_from_its_checkpoint_after_a_restart(settings: Settings) -> None:
    with running_service(settings) as first, channel_to(first) as channel:
        client = stub(channel)
        # enough epochs that the drain always lands mid-training: 3 tiny ones could all finish before it
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("resumable", training={"epochs": EPOCHS})))
        wait_event(client, job.id, "CHECKPOINT", timeout=180)
        first.stop(drain=True)  # the worker stops at its next safe point; the job goes back to the queue
        assert first.store.get_job(job.id).state == JobState.QUEUED
    with running_service(settings) as second, channel_to(second) as channel:
        client = stub(channel)
        done = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED), timeout=180)
        assert done.state == pb.SUCCEEDED, done.error
        assert done.result.epochs_completed == EPOCHS and done.attempts == 1
        messages = [e.message for e in all_events(client, job.id)]
        assert any(m.startswith("resumed from") for m in messages)


def test_sigterm_drains_and_stops_the_service_process(settings: Settings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env |= {"TUNESERVE_STATE_DIR": str(settings.state_dir), "TUNESERVE_PORT": "0",
            "TUNESERVE_TORCHSERVE_ENABLED": "false", "TUNESERVE_MAX_CONCURRENT_JOBS": "1"}  # fmt: skip
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from service.app import run_service; run_service()"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(
                lambda: "tuneserve is serving on" in log.read_text(), timeout=120, what="the service to start"
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            process.kill()
    text = log.read_text()
    assert "received SIGTERM; draining" in text and "stopped" in text.splitlines()[-1]
