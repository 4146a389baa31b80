"""Two service replicas (two start_service, one process each's worth) on one real PostgreSQL (tests/pg.py),
with workers whose reports reach the replica that did NOT launch them, as the tuneserve-reporting Service
of docker/k8s/trainer may route them when docker/k8s/replicas runs two control planes. The workers are
real processes (tests/unit/fake_worker.py) reporting through the real reporting client and servers."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from harness import make_settings, wait_for

from service.api.gen.tuneserve.internal.v1 import reporting_pb2 as rpb
from service.api.gen.tuneserve.internal.v1 import reporting_pb2_grpc as rpb_grpc
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service, start_service
from service.jobs.launcher import REPORT_ADDRESS_ENV, WorkerHandle
from service.jobs.local_launcher import LocalProcessLauncher
from service.jobs.store import JobStore
from service.jobs.store_grants import SharedGrants
from service.records import EventKind, Job, JobState
from tests.store_backends import make_spec

pytestmark = pytest.mark.timeout(300)

FAKE_WORKER = Path(__file__).resolve().parents[1] / "unit" / "fake_worker.py"


def fake_command(job_id: str) -> list[str]:
    return [sys.executable, str(FAKE_WORKER), "--job-id", job_id]


class PeerReporting(LocalProcessLauncher):
    """Starts the stand-in worker, telling it to report to `peer`: the other replica's reporting API."""

    peer = ""

    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        assert self.peer, "the peer's address is set before any job is created"
        return super().start(job, devices, {**env, REPORT_ADDRESS_ENV: self.peer})


@dataclass
class Pair:
    services: dict[str, Service]
    store: JobStore  # the test's own connection to the shared database
    url: str

    def other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def create(self, name: str) -> str:
        job_id = self.store.create_job(make_spec(name)).id
        for service in self.services.values():
            service.scheduler.wake()
        return job_id

    def started_on(self, job_id: str) -> str:
        """The replica that launched the job's worker, once the worker has reported it started."""
        wait_for(lambda: "fake worker started" in self.infos(job_id), 60, f"job {job_id}'s worker")
        owner = self.store.lease_owner(job_id)
        assert owner in self.services
        return owner

    def infos(self, job_id: str) -> list[str]:
        return [e.message for e in self.store.events_after(job_id) if e.kind == EventKind.INFO]

    def reporting(self, name: str) -> rpb_grpc.ReportingStub:
        return rpb_grpc.ReportingStub(grpc.insecure_channel(self.services[name].reporting.address))

    def public(self, name: str) -> pb_grpc.FineTuningStub:
        return pb_grpc.FineTuningStub(grpc.insecure_channel(f"127.0.0.1:{self.services[name].port}"))


@pytest.fixture
def pair(tmp_path: Path, postgres_database: str) -> Iterator[Pair]:
    services: dict[str, Service] = {}
    launchers: dict[str, PeerReporting] = {}
    try:
        for name in ("a", "b"):
            settings = make_settings(
                tmp_path / name,
                database_url=postgres_database,
                replica_id=name,
                lease_s=30.0,
                report_heartbeat_s=0.2,
                cancel_grace_s=20.0,
            )
            launchers[name] = PeerReporting(settings, command=fake_command)
            services[name] = start_service(settings, launcher=launchers[name])
        launchers["a"].peer = services["b"].reporting.address
        launchers["b"].peer = services["a"].reporting.address
        store = JobStore(postgres_database)
        yield Pair(services, store, postgres_database)
        store.close()
    finally:
        for service in services.values():
            service.stop(drain=False)
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute("TRUNCATE events, jobs, write_probe, report_grants RESTART IDENTITY")


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def refused(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()  # type: ignore[no-any-return,attr-defined]


def test_a_worker_reporting_to_the_replica_that_did_not_launch_it_finishes_its_job(pair: Pair) -> None:
    job_id = pair.create("ok-across")
    launched_by = pair.started_on(job_id)
    final = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
    done = wait_for(
        lambda: (job := pair.store.get_job(job_id)).state in final and job, 60, f"{job_id} to end"
    )
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.result.archive_path == "/nowhere/x.mar"  # the worker's result, through the other replica
    states = [e.message for e in pair.store.events_after(job_id) if e.kind == EventKind.STATE]
    assert f"QUEUED -> RUNNING: claimed by {launched_by}" in states
    assert "RUNNING -> PACKAGING: trained" in states  # the worker's own move


def test_a_cancel_on_one_replica_reaches_a_worker_reporting_to_the_other_and_strangers_are_refused(
    pair: Pair,
) -> None:
    first, second = pair.create("slow-one"), pair.create("slow-two")
    owners = {job_id: pair.started_on(job_id) for job_id in (first, second)}
    assert sorted(owners.values()) == ["a", "b"]  # one job a replica: each replica's worker reports across

    # a third replica's grants, on jobs it claimed (a and b are full): any replica checks them
    c_store = JobStore(pair.url)
    try:
        c = SharedGrants(c_store, "c")
        mine, other = (pair.store.create_job(make_spec(n)).id for n in ("held-c", "other-c"))
        for _ in range(2):
            assert c_store.claim_next("c", 60.0) is not None
        token = c.issue(mine)
        c.issue(other)
        for name in ("a", "b"):
            stub = pair.reporting(name)
            beat = stub.Heartbeat(rpb.HeartbeatRequest(job_id=mine), metadata=bearer(token))
            assert beat.stop_reason == ""
            assert (
                refused(
                    lambda s=stub: s.Heartbeat(rpb.HeartbeatRequest(job_id=other), metadata=bearer(token))
                )
                == grpc.StatusCode.PERMISSION_DENIED
            )
            assert (
                refused(
                    lambda s=stub: s.Heartbeat(rpb.HeartbeatRequest(job_id=mine), metadata=bearer("stale"))
                )
                == grpc.StatusCode.UNAUTHENTICATED
            )
        c.revoke(mine)
        for name in ("a", "b"):
            stub = pair.reporting(name)
            assert (
                refused(lambda s=stub: s.Heartbeat(rpb.HeartbeatRequest(job_id=mine), metadata=bearer(token)))
                == grpc.StatusCode.UNAUTHENTICATED
            )
        for job_id in (mine, other):
            pair.store.transition(job_id, JobState.FAILED, "the test's third replica is done")
    finally:
        c_store.close()

    for job_id, launched_by in owners.items():
        # asked of the replica the worker reports to, which did not launch it
        pair.public(pair.other(launched_by)).CancelJob(pb.CancelJobRequest(job_id=job_id))
    for job_id in owners:
        wait_for(
            lambda j=job_id: pair.store.get_job(j).state == JobState.CANCELLED, 60, f"{job_id} cancelled"
        )
        stopping = [e for e in pair.store.events_after(job_id) if e.message == "fake worker stopping"]
        assert [e.data["reason"] for e in stopping] == ["cancelled"]  # from the heartbeat reply
