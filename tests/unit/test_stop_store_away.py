"""A replica stopped (SIGTERM: a drain) while its PostgreSQL is down: nothing can be recorded, so the jobs
stay leased to it, for whoever takes them over; a TrainJob is left training (the replica that takes the job
over adopts it), a local worker is stopped and released, and its job runs again once it is re-queued.
Before, the drain raised UNAVAILABLE at its first write and left every worker as it was.

Real: a PostgreSQL of its own (tests/pg.py), stopped and started again, the scheduler with the intake and
claims the service builds for it, local worker processes that report through the real reporting server.
STAND-INS, as in test_k8s_takeover.py: the Kubernetes API server, and the workers (fake_worker.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s_api_standin import running_standin
from k8s_crds import crd_folder
from test_k8s_launcher import NS, spec, wait_for
from test_k8s_takeover import adopted_by_other, replica_on_postgres
from test_scheduler import fake_command, make_spec

from service.api.reporting_server import start_reporting_server
from service.jobs.intake import intake_for
from service.jobs.local_launcher import LocalProcessLauncher
from service.jobs.scheduler import Scheduler
from service.jobs.store import JobStore
from service.jobs.store_open import store_target
from service.records import JobState
from service.settings import Settings
from tests.pg import PostgresServer, once_back, postgres_of_its_own


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own: it is stopped mid-test."""
    with postgres_of_its_own() as made:
        yield made


@pytest.mark.skipif(crd_folder() is None, reason="no k8s-crds folder (see tests/k8s_crds.py)")
@pytest.mark.timeout(120)
def test_a_trainjob_is_left_training_for_the_replica_that_takes_its_job_over(
    tmp_path: Path, server: PostgresServer
) -> None:
    url = server.create_database("jobs")
    settings = {"replica_id": "me", "lease_s": 3.0, "drain_grace_s": 10.0}
    with running_standin() as api, replica_on_postgres(api, tmp_path, url, **settings) as me:
        store, scheduler = me.store, me.scheduler
        scheduler.start()
        job = store.create_job(spec())
        scheduler.wake()
        wait_for(lambda: job.id in scheduler.running())
        (name,) = api.trainjobs(NS)

        server.stop()
        began = time.monotonic()
        scheduler.stop(drain=True)  # the hand-over fails, and so does the drain's first write
        assert time.monotonic() - began < 10.0  # no drain to wait for: the TrainJob trains on
        assert api.deletes("trainjobs") == [] and list(api.trainjobs(NS)) == [name]

        server.start()
        job = once_back(lambda: store.get_job(job.id))
        assert (job.state, job.attempts) == (JobState.RUNNING, 1)  # nothing recorded: still "me"'s
        assert store.lease_owner(job.id) == "me"
        # another replica, once the lease has run out, adopts it: the worker's grant was left in place
        wait_for(lambda: adopted_by_other(store, job.id, me.cluster.launcher))
        assert list(api.trainjobs(NS)) == [name]


@pytest.mark.timeout(120)
def test_a_local_worker_is_stopped_and_its_job_runs_again_once_requeued(
    tmp_path: Path, server: PostgresServer
) -> None:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state", "database_url": server.create_database("jobs"),
        "replica_id": "me", "lease_s": 30.0, "drain_grace_s": 5.0, "cancel_grace_s": 1.0,
        "max_concurrent_jobs": 1,
    }  # fmt: skip
    settings = Settings(**values)
    store = JobStore(store_target(settings))
    intake = intake_for(store, settings)  # grants in the database, as the service has them on PostgreSQL
    reporting = start_reporting_server(settings, intake)

    def scheduler() -> Scheduler:
        launcher = LocalProcessLauncher(settings, command=fake_command)
        return Scheduler(settings, store, launcher, intake, reporting.address, poll_s=0.05)

    try:
        first = scheduler()
        first.start()
        job_id = store.create_job(make_spec("slow-store-away")).id
        first.wake()
        wait_for(lambda: any(e.message == "fake worker started" for e in store.events_after(job_id)))
        pid = int(str(store.worker_ref(job_id)))

        server.stop()
        began = time.monotonic()
        first.stop(drain=True)
        assert time.monotonic() - began < 5.0 + 3.0  # the drain's grace, and the kill
        assert not Path(f"/proc/{pid}").exists()  # asked to stop, then released: not left unwatched

        server.start()
        job = once_back(lambda: store.get_job(job_id))
        assert job.state == JobState.RUNNING and store.lease_owner(job_id) == "me"  # nothing recorded
        again = scheduler()  # the replica started again under its name: its predecessor's job resumes
        again.start()
        try:
            wait_for(
                lambda: [e.message for e in store.events_after(job_id)].count("fake worker started") == 2,
                30.0,
            )
            assert store.get_job(job_id).state == JobState.RUNNING
        finally:
            again.stop(drain=False)
    finally:
        reporting.stop()
        store.close()
