"""A job taken over by another replica (its lease ran out) on Kubernetes: the re-queue refunds the attempt,
so the new launch's TrainJob has the name of the one the dead replica left. The stand-in API server
(tests/k8s_api_standin.py) answers 409 for a duplicate name, as a real one does. And a replica that
finds its job adopted by another (it was cut off for longer than a lease) leaves the TrainJob running;
one restarted under its name watches its TrainJobs again, and stops the one asked to cancel meanwhile."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from k8s_api_standin import StandInApiServer, running_standin
from k8s_crds import crd_folder
from test_k8s_launcher import ADVERTISED, NS, Cluster, launch_env, spec, wait_for

from service.jobs.intake import Intake, intake_for
from service.jobs.k8s_launcher import KubernetesLauncher
from service.jobs.launcher import REPORT_TOKEN_ENV, LaunchError
from service.jobs.scheduler import Scheduler
from service.jobs.store import JobStore
from service.jobs.store_grants import SharedGrants
from service.jobs.trainjob_manifest import TOKEN_KEY, secret_name
from service.records import EventKind, JobState
from tests.pg import PostgresServer

pytestmark = pytest.mark.skipif(crd_folder() is None, reason="no k8s-crds folder (see tests/k8s_crds.py)")
NEW_TOKEN = "tok-new-7c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_standin() as api:
        made = Cluster(api, tmp_path)
        yield made
        made.store.close()


def other_replica(cluster: Cluster) -> KubernetesLauncher:
    client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=cluster.api.url))
    return KubernetesLauncher(cluster.settings, cluster.reported_failed, client)


def test_a_takeover_replaces_the_trainjob_the_dead_replica_left_under_the_same_name(cluster: Cluster) -> None:
    job, left = cluster.start()  # the replica that died launched attempt 1
    name = left.ref.split("/")[1]
    handle = other_replica(cluster).start(
        job, (), {**launch_env(cluster.settings), REPORT_TOKEN_ENV: NEW_TOKEN}
    )
    assert handle.ref == left.ref
    assert list(cluster.api.trainjobs(NS)) == [name]  # the new one: the leftover was deleted first
    assert cluster.api.secrets(NS)[secret_name(name)]["stringData"][TOKEN_KEY] == NEW_TOKEN
    assert [r.name for r in cluster.api.deletes("trainjobs")] == [name]


def test_any_other_refusal_to_create_still_fails_the_launch(cluster: Cluster) -> None:
    job, _ = cluster.start()
    cluster.api.refuse(403, "create", "trainjobs")
    with pytest.raises(LaunchError, match="HTTP 403"):
        other_replica(cluster).start(job, (), launch_env(cluster.settings))
    assert cluster.api.deletes("trainjobs") == []  # a refusal other than a duplicate deletes nothing


@dataclass
class ReplicaOnPostgres:
    """One replica's scheduler on the shared PostgreSQL, launching TrainJobs on the stand-in cluster."""

    cluster: Cluster
    store: JobStore
    scheduler: Scheduler


@contextmanager
def replica_on_postgres(
    api: StandInApiServer, tmp_path: Path, database_url: str, **settings: Any
) -> Iterator[ReplicaOnPostgres]:
    """A scheduler (not started) with the real intake and claims for its settings; closed at the end."""
    cluster = Cluster(api, tmp_path, database_url=database_url, **settings)
    store = JobStore(database_url)
    intake = intake_for(store, cluster.settings)
    try:
        yield ReplicaOnPostgres(
            cluster,
            store,
            Scheduler(cluster.settings, store, cluster.launcher, intake, ADVERTISED, poll_s=0.05),
        )
    finally:
        store.close()
        cluster.store.close()


def adopted_by_other(store: JobStore, job_id: str, launcher: KubernetesLauncher, owner: str = "me") -> bool:
    """What another replica does once this one has been cut off for longer than a lease; False when this
    replica's own renewal came between the expiry and the take-over (then: try again)."""
    with store.db.write() as db:
        db.run(
            "UPDATE jobs SET lease_expires = 1 WHERE id = :id AND lease_owner = :o",
            {"id": job_id, "o": owner},
        )
    done = store.take_over_expired("other", 60.0, launcher.can_adopt)
    return [a.job.id for a in done.adopted] == [job_id]


@pytest.mark.timeout(120)
def test_a_replica_whose_trainjob_another_adopted_stops_watching_it_and_leaves_it_running(
    tmp_path: Path, postgres_database: str
) -> None:
    with (
        running_standin() as api,
        replica_on_postgres(api, tmp_path, postgres_database, replica_id="me", lease_s=1.0) as me,
    ):
        store, scheduler = me.store, me.scheduler
        scheduler.start()
        try:
            job = store.create_job(spec())
            scheduler.wake()
            (name,) = wait_for(lambda: list(api.trainjobs(NS)))
            wait_for(lambda: job.id in scheduler.running())
            wait_for(lambda: adopted_by_other(store, job.id, me.cluster.launcher))
            wait_for(lambda: job.id not in scheduler.running())  # its next renewal found it gone
            assert api.deletes("trainjobs") == [] and list(api.trainjobs(NS)) == [name]
            assert api.deletes("secrets") == []
            with store.db.read() as db:  # the adopter's grant is left to it: the worker may report on
                grant = db.one("SELECT replica FROM report_grants WHERE job_id = :j", {"j": job.id})
            assert grant is not None and grant["replica"] == "other"
        finally:
            scheduler.stop(drain=False)


@pytest.mark.timeout(120)
def test_a_replica_restarted_under_its_name_watches_its_trainjobs_again_and_stops_the_cancelled_one(
    tmp_path: Path, postgres_database: str
) -> None:
    """Both TrainJobs its predecessor left are watched again; the one asked to cancel while no replica
    watched it is stopped as any cancel: the stop reaches its worker in the heartbeat reply, the worker's
    exit fails the TrainJob, the job is CANCELLED and the TrainJob deleted (no longer left behind)."""
    with (
        running_standin() as api,
        replica_on_postgres(api, tmp_path, postgres_database, replica_id="me", lease_s=30.0) as me,
    ):
        store, cluster = me.store, me.cluster
        # what the process that died left: two TrainJobs it launched, one of them asked to cancel since
        left: dict[str, str] = {}
        tokens: dict[str, str] = {}
        for name in ("trains-on", "cancelled"):
            job_id = store.create_job(spec().model_copy(update={"name": name})).id
            assert store.claim_next("me", 30.0) is not None
            tokens[name] = SharedGrants(store, "me").issue(job_id)
            handle = cluster.launcher.start(
                store.get_job(job_id), (), {**launch_env(cluster.settings), REPORT_TOKEN_ENV: tokens[name]}
            )
            store.set_worker_ref(job_id, handle.ref)
            left[name] = job_id
        store.request_cancel(left["cancelled"])
        trains_on, cancelled = (
            str(store.worker_ref(left[n])).split("/")[1] for n in ("trains-on", "cancelled")
        )
        scheduler = me.scheduler
        scheduler.start()
        try:
            assert sorted(scheduler.running()) == sorted(left.values())
            job = store.get_job(left["trains-on"])
            assert (job.state, job.attempts) == (JobState.RUNNING, 1)
            with store.db.read() as db:
                grants = db.all("SELECT job_id FROM report_grants WHERE replica = 'me'")
            assert sorted(g["job_id"] for g in grants) == sorted(left.values())
            # the cancelled job's worker (a stand-in: this test) hears the stop and exits; the Trainer
            # controller then marks its TrainJob Failed
            worker = SharedGrants(store, "me")
            wait_for(lambda: worker.check(tokens["cancelled"], left["cancelled"]) == "cancelled")
            assert worker.check(tokens["trains-on"], left["trains-on"]) is None
            api.set_condition(NS, cancelled, "Failed", "PodFailed", "exit code 75")
            wait_for(lambda: store.get_job(left["cancelled"]).state == JobState.CANCELLED)
            wait_for(lambda: cancelled not in api.trainjobs(NS))
            assert [r.name for r in api.deletes("trainjobs")] == [cancelled]
            assert scheduler.running() == [left["trains-on"]] and trains_on in api.trainjobs(NS)
            assert store.get_job(left["cancelled"]).attempts == 1  # stopped, not relaunched
        finally:
            scheduler.stop(drain=False)


@pytest.mark.timeout(120)
def test_a_stopping_replica_that_no_one_relieves_drains_its_trainjob_as_before(
    tmp_path: Path, postgres_database: str
) -> None:
    """The hand-over is offered for a third of a lease and a bit; with no other replica there, the job is
    this replica's again and is drained: asked to stop, then re-queued with its attempt refunded."""
    settings = {"replica_id": "alone", "lease_s": 1.0, "drain_grace_s": 3.0}
    with running_standin() as api, replica_on_postgres(api, tmp_path, postgres_database, **settings) as alone:
        store, scheduler = alone.store, alone.scheduler
        scheduler.start()
        try:
            job = store.create_job(spec().model_copy(update={"name": "drained"}))
            scheduler.wake()
            wait_for(lambda: job.id in scheduler.running())
        finally:
            scheduler.stop(drain=True)
        infos = [e.message for e in store.events_after(job.id) if e.kind == EventKind.INFO]
        assert any("offered to the other replicas" in m for m in infos)
        assert any("no other replica adopted it" in m for m in infos)
        drained = store.get_job(job.id)
        assert (drained.state, drained.attempts) == (JobState.QUEUED, 0)
        with store.db.read() as db:  # the next start of a replica resumes it; nothing is left running
            assert db.one("SELECT lease_owner FROM jobs WHERE id = :j", {"j": job.id})["lease_owner"] is None
        assert not api.trainjobs(NS)


@pytest.mark.timeout(120)
def test_a_draining_replica_whose_trainjob_another_adopts_meanwhile_leaves_it_to_that_replica(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """Taken over while draining (the replica's renewals failed for longer than a lease, or its offer
    could not be withdrawn): the drain stops watching the TrainJob instead of killing it at the drain's
    end, and the adopter lets its worker train on (the drain it was asked for was the old replica's)."""
    settings = {"replica_id": "drainer", "lease_s": 1.0, "drain_grace_s": 30.0}
    # a database of its own: the module's holds jobs the tests above left, which this replica would claim
    with (
        database_of_its_own(postgres_server) as database,
        running_standin() as api,
        replica_on_postgres(api, tmp_path, database, **settings) as me,
    ):
        store, scheduler = me.store, me.scheduler
        scheduler.start()
        job = store.create_job(spec().model_copy(update={"name": "adopted-while-draining"}))
        scheduler.wake()
        wait_for(lambda: job.id in scheduler.running())
        stopping = threading.Thread(target=scheduler.stop, kwargs={"drain": True})
        stopping.start()
        try:
            wait_for(lambda: any("no other replica adopted it" in m for m in infos(store, job.id)))
            wait_for(lambda: stop_reason(store, job.id) == "draining")  # the worker is asked to drain
            wait_for(lambda: adopted_by_other(store, job.id, me.cluster.launcher, owner="drainer"))
            stopping.join(timeout=10.0)  # not the drain's 30 s: it lets the adopted worker go at once
            assert not stopping.is_alive()
        finally:
            stopping.join()
        assert api.deletes("trainjobs") == [] and len(api.trainjobs(NS)) == 1
        assert store.lease_owner(job.id) == "other"
        with store.db.read() as db:
            grant = db.one("SELECT replica FROM report_grants WHERE job_id = :j", {"j": job.id})
        assert grant is not None and grant["replica"] == "other"
        assert stop_reason(store, job.id) is None  # the adopter's worker trains on
        job = store.get_job(job.id)
        assert (job.state, job.attempts) == (JobState.RUNNING, 1)


@pytest.mark.timeout(120)
def test_a_trainjob_that_heard_the_drain_before_its_adoption_is_requeued_at_its_exit_not_retried(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """The process that died had drained both its TrainJobs (it could not hand them over); one's worker
    heard it in a heartbeat reply. The restarted replica lets the other train on, and waits for the one
    that heard to stop: its exit re-queues the job as a drain (attempt refunded), not as a crash."""
    with (
        database_of_its_own(postgres_server) as database,  # the relaunch claims any queued job
        running_standin() as api,
        # a cancel's grace shorter than the drain's: the drained worker has the drain's to checkpoint
        replica_on_postgres(
            api, tmp_path, database, replica_id="me", lease_s=30.0, cancel_grace_s=0.5, drain_grace_s=60.0
        ) as me,
    ):
        store, cluster = me.store, me.cluster
        left: dict[str, str] = {}
        tokens: dict[str, str] = {}
        predecessor = intake_for(store, cluster.settings)  # the process that died, and its workers' calls
        for name in ("heard", "not-heard"):
            left[name], tokens[name] = drained_by(predecessor, store, cluster, name)
        assert predecessor.heartbeat(tokens["heard"], left["heard"]) == "draining"
        heard = str(store.worker_ref(left["heard"])).split("/")[1]
        scheduler = me.scheduler
        scheduler.start()
        try:
            assert sorted(scheduler.running()) == sorted(left.values())
            assert stop_reason(store, left["not-heard"]) is None  # trains on
            assert stop_reason(store, left["heard"]) == "draining"
            time.sleep(1.5)  # three cancel graces: the worker checkpoints meanwhile, not killed
            # and the scheduler has looked since: its tick reads the TrainJob, then checks the stop's
            # grace; by a second read after the sleep, a check after the grace has run
            after = len(api.requests)
            wait_for(lambda: sum(r.method == "GET" and r.name == heard for r in api.requests[after:]) >= 2)
            assert api.deletes("trainjobs") == []
            # its worker (a stand-in: this test) checkpoints and exits 75; the Trainer controller then
            # marks the TrainJob Failed
            api.set_condition(NS, heard, "Failed", "PodFailed", "exit code 75")
            wait_for(lambda: any("drain; the job resumes" in m for m in states(store, left["heard"])))
            warnings = [e.message for e in store.events_after(left["heard"]) if e.kind == EventKind.WARNING]
            assert not any("retrying" in m for m in warnings)  # not counted as a crash
            wait_for(lambda: store.get_job(left["heard"]).state == JobState.RUNNING)  # relaunched here
            assert store.get_job(left["heard"]).attempts == 1  # the drained attempt was refunded
            assert left["not-heard"] in scheduler.running()
            assert store.get_job(left["not-heard"]).attempts == 1
        finally:
            scheduler.stop(drain=False)


@pytest.mark.timeout(120)
def test_a_drained_adopted_trainjob_whose_job_is_cancelled_gets_the_cancels_grace_not_the_drains(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """It heard its last replica's drain (so it stops), then its job was cancelled: the cancel's grace
    (0.5 s here) bounds how long it may take to stop, not the drain's (60 s)."""
    with (
        database_of_its_own(postgres_server) as database,
        running_standin() as api,
        replica_on_postgres(
            api, tmp_path, database, replica_id="me", lease_s=30.0, cancel_grace_s=0.5, drain_grace_s=60.0
        ) as me,
    ):
        store, cluster = me.store, me.cluster
        predecessor = intake_for(store, cluster.settings)  # the process that died, and its worker's calls
        job_id, token = drained_by(predecessor, store, cluster, "heard")
        assert predecessor.heartbeat(token, job_id) == "draining"
        scheduler = me.scheduler
        scheduler.start()
        try:
            assert scheduler.running() == [job_id]
            store.request_cancel(job_id)
            # its worker (a stand-in: this test) never stops: it is killed, its TrainJob deleted
            wait_for(lambda: api.deletes("trainjobs"), timeout=20)
        finally:
            scheduler.stop(drain=False)


def drained_by(predecessor: Intake, store: JobStore, cluster: Cluster, name: str) -> tuple[str, str]:
    """A job `predecessor` (the process that died, replica "me") launched as a TrainJob and then asked to
    stop for its drain; its id and its worker's reporting token."""
    job_id = store.create_job(spec().model_copy(update={"name": name})).id
    assert store.claim_next("me", 30.0) is not None
    token = predecessor.issue(job_id)
    handle = cluster.launcher.start(
        store.get_job(job_id), (), {**launch_env(cluster.settings), REPORT_TOKEN_ENV: token}
    )
    store.set_worker_ref(job_id, handle.ref)
    predecessor.request_stop(job_id, "draining")
    return job_id, token


def states(store: JobStore, job_id: str) -> list[str]:
    return [e.message for e in store.events_after(job_id) if e.kind == EventKind.STATE]


def infos(store: JobStore, job_id: str) -> list[str]:
    return [e.message for e in store.events_after(job_id) if e.kind == EventKind.INFO]


def stop_reason(store: JobStore, job_id: str) -> str | None:
    """What the worker's next heartbeat reply says: the stop its grant holds."""
    with store.db.read() as db:
        row = db.one("SELECT stop_reason FROM report_grants WHERE job_id = :j", {"j": job_id})
    return None if row is None else row["stop_reason"]


@contextmanager
def database_of_its_own(server: PostgresServer) -> Iterator[str]:
    """A new, empty database on the session's PostgreSQL, dropped at the end."""
    name = f"takeover_{secrets.token_hex(4)}"
    url = server.create_database(name)
    try:
        yield url
    finally:
        server.drop_database(name)
