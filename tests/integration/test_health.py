"""Health on a real server: per-name readiness as a probe reports it; the job side's store and scheduler."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import channel_to, make_image_folder, make_settings, running_service, spec, stub, wait_state

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.health import HealthReporter

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def status_of(channel: grpc.Channel, name: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name)).status


def test_each_probed_name_is_published_and_a_vanished_one_becomes_unknown(tmp_path: Path) -> None:
    readiness = {"torchserve": True, "torchserve/pets": False}
    with running_service(make_settings(tmp_path)) as service, channel_to(service) as channel:
        reporter = HealthReporter(lambda: readiness, service.server.set_serving)
        reporter.report_once()
        first = {name: status_of(channel, name) for name in readiness}
        readiness.update({"torchserve/pets": True})
        reporter.report_once()
        ready = status_of(channel, "torchserve/pets")
        del readiness["torchserve/pets"]
        reporter.report_once()
        gone = status_of(channel, "torchserve/pets")
    assert first == {"torchserve": SERVING, "torchserve/pets": NOT_SERVING}
    assert ready == SERVING and gone == UNKNOWN


def test_a_failing_probe_reports_what_it_knew_not_serving(tmp_path: Path) -> None:
    calls = []

    def probe() -> dict[str, bool]:
        calls.append(time.monotonic())
        if len(calls) > 1:
            raise ConnectionError("TorchServe's management API went away")
        return {"torchserve": True, "torchserve/pets": True}

    with running_service(make_settings(tmp_path)) as service, channel_to(service) as channel:
        reporter = HealthReporter(probe, service.server.set_serving, interval_s=0.05)
        reporter.start()
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        reporter.stop()
        after = {name: status_of(channel, name) for name in ("torchserve", "torchserve/pets")}
    assert len(calls) >= 3  # the thread keeps probing after a failure
    assert after == {"torchserve": NOT_SERVING, "torchserve/pets": NOT_SERVING}


# ---------------------------------------------------------------------- the job side: store and scheduler

JOBS_NAMES = ("", "tuneserve.v1.FineTuning")


def wait_status(channel: grpc.Channel, status: int, timeout: float = 20.0) -> dict[str, int]:
    """Poll until every job-side name reports `status`; returns what they reported last."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {name: status_of(channel, name) for name in JOBS_NAMES}
        if set(seen.values()) == {status} or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


@contextmanager
def read_only(files: list[Path]) -> Iterator[None]:
    """Make writes to `files` really fail. As root, chmod stops nothing: use the immutable attribute
    (`chattr +i`, ext4/xfs/btrfs), under which even an already-open descriptor cannot write."""
    if os.geteuid() != 0:
        for file in files:
            file.chmod(0o444)
        try:
            yield
        finally:
            for file in files:
                file.chmod(0o644)
        return
    done = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make the store immutable here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, files)], check=True)


def test_a_job_store_that_cannot_be_written_is_not_serving_until_it_can(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "ds")
    settings = make_settings(tmp_path, health_interval_s=0.1)
    with running_service(settings) as service, channel_to(service) as channel:
        client = stub(channel)
        before = wait_status(channel, SERVING)
        db = settings.jobs_db
        with read_only([db, db.with_name(db.name + "-wal")]):
            during = wait_status(channel, NOT_SERVING)
            with pytest.raises(grpc.RpcError) as refused:  # the truth behind the status
                client.CreateJob(pb.CreateJobRequest(spec=spec("blocked")))
        after = wait_status(channel, SERVING)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("again")))
        names = [j.spec.name for j in client.ListJobs(pb.ListJobsRequest()).jobs]
    assert set(before.values()) == {SERVING}
    assert set(during.values()) == {NOT_SERVING}
    # the store's I/O error, not the client's fault: retry later
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "job store cannot be written" in (refused.value.details() or "")
    assert set(after.values()) == {SERVING} and job.id and names == ["again"]


def kill_thread(thread: threading.Thread) -> None:
    """End `thread` the way an unexpected BaseException would: raised inside it, at its next bytecode."""
    assert thread.ident is not None
    exc = ctypes.py_object(SystemExit)
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), exc)
    assert hit == 1
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the kill, on purpose
def test_a_dead_scheduler_thread_is_not_serving_then_restarted_and_schedules_again(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "ds")
    # a long interval: the NOT_SERVING between the death and the restart lasts one interval
    settings = make_settings(tmp_path, health_interval_s=1.0)
    with running_service(settings) as service, channel_to(service) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        statuses: list[int] = []
        watcher = threading.Thread(target=lambda: statuses.extend(r.status for r in watch), daemon=True)
        watcher.start()
        wait_status(channel, SERVING)
        dead = service.scheduler._loop.thread
        assert dead is not None
        kill_thread(dead)
        during = wait_status(channel, NOT_SERVING)
        after = wait_status(channel, SERVING)
        client = stub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("after-restart")))
        # launched by the new thread
        ran = wait_state(client, job.id, (pb.RUNNING, pb.PACKAGING, pb.SUCCEEDED))
        client.CancelJob(pb.CancelJobRequest(job_id=job.id))
        watch.cancel()
    assert set(during.values()) == {NOT_SERVING} and set(after.values()) == {SERVING}
    assert service.scheduler._loop.thread is not dead
    assert ran.state != pb.QUEUED
    assert statuses.index(NOT_SERVING) < len(statuses) - 1 - statuses[::-1].index(SERVING)
