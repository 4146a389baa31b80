"""The internal reporting API on a real loopback server: job-scoped tokens, the moves a worker may make,
stop reasons in heartbeats, ordered and batched events, and a worker cut off from its control plane."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest

from service.api.gen.tuneserve.internal.v1 import reporting_pb2 as pb
from service.api.gen.tuneserve.internal.v1 import reporting_pb2_grpc as pb_grpc
from service.api.report_client import GrpcReporter, ReadyChannel
from service.api.reporting_server import ReportingServer, start_reporting_server
from service.jobs.intake import Intake
from service.jobs.store import JobStore
from service.records import EventKind, JobState
from service.settings import Settings
from service.spec import JobSpec

T = TypeVar("T")


class Plane:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = Settings(state_dir=tmp_path)
        self.store = JobStore(self.settings.jobs_db)
        self.intake = Intake(self.store)
        self.server: ReportingServer = start_reporting_server(self.settings, self.intake)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.ReportingStub(self.channel)

    def running_job(self, name: str = "w") -> str:
        spec = JobSpec.model_validate(
            {"name": name, "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
        )
        job_id = self.store.create_job(spec).id
        self.store.transition(job_id, JobState.RUNNING)
        return job_id

    def reporter(self, job_id: str, **kwargs: float) -> GrpcReporter:
        return GrpcReporter(self.server.address, self.intake.issue(job_id), job_id, **kwargs).start()

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)
        self.store.close()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    made = Plane(tmp_path)
    yield made
    made.close()


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()  # type: ignore[no-any-return,attr-defined]


def test_the_reporting_server_listens_on_loopback_by_default(plane: Plane) -> None:
    assert plane.server.host == "127.0.0.1" and plane.server.port > 0


def test_a_token_is_refused_for_any_other_job(plane: Plane) -> None:
    mine, other = plane.running_job("mine"), plane.running_job("other")
    token = plane.intake.issue(mine)
    plane.intake.issue(other)
    for call in (
        lambda: plane.stub.GetAssignment(pb.AssignmentRequest(job_id=other), metadata=bearer(token)),
        lambda: plane.stub.Heartbeat(pb.HeartbeatRequest(job_id=other), metadata=bearer(token)),
        lambda: plane.stub.AppendEvents(
            pb.AppendEventsRequest(job_id=other, events=[pb.Event(kind="INFO", message="x")]),
            metadata=bearer(token),
        ),
    ):
        assert status_of(call) == grpc.StatusCode.PERMISSION_DENIED
    assert [e.message for e in plane.store.events_after(other)] == ["job queued", "QUEUED -> RUNNING"]


def test_an_unknown_missing_or_revoked_token_is_unauthenticated(plane: Plane) -> None:
    job_id = plane.running_job()
    request = pb.HeartbeatRequest(job_id=job_id)
    assert (
        status_of(lambda: plane.stub.Heartbeat(request, metadata=bearer("guess")))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert status_of(lambda: plane.stub.Heartbeat(request)) == grpc.StatusCode.UNAUTHENTICATED
    token = plane.intake.issue(job_id)
    assert plane.stub.Heartbeat(request, metadata=bearer(token)).stop_reason == ""
    plane.intake.revoke(job_id)  # the worker exited
    assert (
        status_of(lambda: plane.stub.Heartbeat(request, metadata=bearer(token)))
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_a_new_launch_gets_a_new_token_and_the_old_one_stops_working(plane: Plane) -> None:
    job_id = plane.running_job()
    first, second = plane.intake.issue(job_id), plane.intake.issue(job_id)
    assert first != second
    request = pb.HeartbeatRequest(job_id=job_id)
    assert (
        status_of(lambda: plane.stub.Heartbeat(request, metadata=bearer(first)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    plane.stub.Heartbeat(request, metadata=bearer(second))


@pytest.mark.parametrize("state", ["SUCCEEDED", "CANCELLED", "QUEUED", "RUNNING"])
def test_a_worker_cannot_move_its_job_where_only_the_scheduler_may(plane: Plane, state: str) -> None:
    job_id = plane.running_job()
    token = plane.intake.issue(job_id)
    move = pb.MoveJobRequest(job_id=job_id, state=state, reason="says the worker")
    assert (
        status_of(lambda: plane.stub.MoveJob(move, metadata=bearer(token)))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert plane.store.get_job(job_id).state == JobState.RUNNING


def test_a_worker_moves_its_job_to_packaging_then_failed_and_no_further(plane: Plane) -> None:
    job_id = plane.running_job()
    reporter = plane.reporter(job_id)
    reporter.move(JobState.PACKAGING, "trained")
    reporter.move(JobState.FAILED, "archiver failed")
    job = plane.store.get_job(job_id)
    assert (job.state, job.error) == (JobState.FAILED, "archiver failed")
    token = plane.intake.issue(job_id)
    again = pb.MoveJobRequest(job_id=job_id, state="FAILED")
    assert (
        status_of(lambda: plane.stub.MoveJob(again, metadata=bearer(token)))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    reporter.close()


def test_the_heartbeat_reply_carries_a_cancel(plane: Plane) -> None:
    job_id = plane.running_job()
    reporter = plane.reporter(job_id, heartbeat_s=0.05)
    assert reporter.stop_requested() is None
    plane.intake.request_stop(job_id, "cancelled")
    deadline = time.monotonic() + 10
    while reporter.stop_requested() is None:  # no signal: the heartbeat alone says so
        assert time.monotonic() < deadline, "no stop reason from the heartbeat"
        time.sleep(0.02)
    assert reporter.stop_requested() == "cancelled"
    reporter.close()


def test_the_assignment_has_the_spec_attempts_and_result_so_far(plane: Plane) -> None:
    job_id = plane.running_job("assigned")
    plane.store.update_result(job_id, archive_path="/a.mar", class_names=("a", "b"))
    reporter = plane.reporter(job_id)
    job = reporter.assignment()
    assert (job.id, job.spec.name, job.state, job.attempts) == (job_id, "assigned", JobState.RUNNING, 1)
    assert job.result.archive_path == "/a.mar" and job.result.class_names == ("a", "b")
    reporter.close()


def test_events_arrive_in_order_under_batching_and_results_after_the_events_before_them(plane: Plane) -> None:
    job_id = plane.running_job()
    reporter = plane.reporter(job_id)
    for i in range(2500):
        reporter.event(EventKind.PROGRESS, f"step {i}", {"i": i})
        if i == 1200:
            reporter.result(epochs_completed=1)  # flushes first: every event before it is stored
            assert plane.store.events_after(job_id, limit=5000)[-1].data == {"i": 1200}
    reporter.close()
    stored = [
        e.data["i"] for e in plane.store.events_after(job_id, limit=5000) if e.kind == EventKind.PROGRESS
    ]
    assert stored == list(range(2500))
    seqs = [e.seq for e in plane.store.events_after(job_id, limit=5000)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_a_retried_batch_is_stored_once(plane: Plane) -> None:
    job_id = plane.running_job()
    token = plane.intake.issue(job_id)
    batch = pb.AppendEventsRequest(
        job_id=job_id, first=0, events=[pb.Event(kind="INFO", message=m) for m in "ab"]
    )
    assert plane.stub.AppendEvents(batch, metadata=bearer(token)).next == 2
    assert plane.stub.AppendEvents(batch, metadata=bearer(token)).next == 2  # its reply was lost: sent again
    messages = [e.message for e in plane.store.events_after(job_id)]
    assert messages[-2:] == ["a", "b"] and messages.count("a") == 1


def test_a_worker_cut_off_from_its_control_plane_stops_draining(plane: Plane) -> None:
    job_id = plane.running_job()
    reporter = plane.reporter(job_id, heartbeat_s=0.05, lost_after_s=0.5)
    reporter.event(EventKind.INFO, "before")
    reporter.flush()
    plane.server.stop(0)  # the service died
    started = time.monotonic()
    while reporter.stop_requested() is None:
        assert time.monotonic() - started < 10, "the worker did not notice"
        time.sleep(0.02)
    assert reporter.stop_requested() == "draining"
    assert time.monotonic() - started >= 0.5  # not at the first failed heartbeat: it waited lost_after_s
    reporter.event(EventKind.INFO, "after")  # nobody to tell: dropped, without blocking for long
    closing = time.monotonic()
    reporter.close()
    assert time.monotonic() - closing < 5


def test_a_worker_that_a_restarted_service_does_not_know_stops_draining(plane: Plane) -> None:
    job_id = plane.running_job()
    reporter = plane.reporter(job_id, heartbeat_s=0.05)
    plane.intake.revoke(job_id)  # what a new service's intake knows of this worker: nothing
    deadline = time.monotonic() + 10
    while reporter.stop_requested() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert reporter.stop_requested() == "draining"
    reporter.close()


def connections_to(port: int) -> set[int]:
    """This process's established TCP connections to `port` on loopback, by their local port."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_a_ready_channel_connects_before_the_job_and_its_reporter_reports_over_it(plane: Plane) -> None:
    """A spare's channel (report_client.ReadyChannel): connected before the job exists; the job's reporter
    uses that very connection (no new one to the server), with the job's token per call."""
    ready = ReadyChannel(plane.server.address, None)
    assert ready.connected
    early = wait_for_value(lambda: connections_to(plane.server.port))
    assert len(early) == 1  # the connection exists before any job or token does

    job_id = plane.running_job()
    channel = ready.take_for(plane.server.address, None)
    assert channel is ready.channel
    reporter = GrpcReporter(plane.server.address, plane.intake.issue(job_id), job_id, channel=channel).start()
    try:
        assert reporter.assignment().id == job_id
        reporter.event(EventKind.INFO, "over the early connection")
        assert reporter.flush(timeout=10)
        assert connections_to(plane.server.port) == early  # the same connection, no second one
    finally:
        reporter.close()
    assert plane.store.events_after(job_id)[-1].message == "over the early connection"


def test_a_job_reporting_elsewhere_gets_a_new_channel_and_the_early_one_is_closed(plane: Plane) -> None:
    """The assignment's address differs from the one connected ahead: fall back to a channel of its own."""
    ready = ReadyChannel(plane.server.address, None)
    early = wait_for_value(lambda: connections_to(plane.server.port))
    other = f"localhost:{plane.server.port}"  # another address (same server, so the job can still report)
    assert ready.take_for(other, None) is None
    assert ready.take_for(plane.server.address, Path("/elsewhere/ca.crt")) is None  # another CA: likewise
    wait_for_value(lambda: not (connections_to(plane.server.port) & early) or None)  # the early one closed

    job_id = plane.running_job()
    reporter = GrpcReporter(other, plane.intake.issue(job_id), job_id).start()
    try:
        assert reporter.assignment().id == job_id
        assert connections_to(plane.server.port) - early  # a connection of its own
    finally:
        reporter.close()


def test_a_ready_channel_to_nobody_says_so_and_does_not_block_for_long(tmp_path: Path) -> None:
    with socket.socket() as taken:  # a port nobody listens on: bound, never listening
        taken.bind(("127.0.0.1", 0))
        started = time.monotonic()
        ready = ReadyChannel(f"127.0.0.1:{taken.getsockname()[1]}", None, connect_timeout_s=0.5)
        assert not ready.connected
        assert time.monotonic() - started < 5
        ready.channel.close()


def wait_for_value(probe: Callable[[], T | None], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
