"""A job taken over by another replica (its lease ran out) on Kubernetes: the re-queue refunds the attempt,
so the new launch's TrainJob has the name of the one the dead replica left. The stand-in API server
(tests/k8s_api_standin.py) answers 409 for a duplicate name, as a real one does. And a replica that
finds its job adopted by another (it was cut off for longer than a lease) leaves the TrainJob running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from k8s_api_standin import running_standin
from k8s_crds import crd_folder
from test_k8s_launcher import ADVERTISED, NS, Cluster, launch_env, spec, wait_for

from service.jobs.intake import intake_for
from service.jobs.k8s_launcher import KubernetesLauncher
from service.jobs.launcher import REPORT_TOKEN_ENV, LaunchError
from service.jobs.scheduler import Scheduler
from service.jobs.store import JobStore
from service.jobs.trainjob_manifest import TOKEN_KEY, secret_name

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


def adopted_by_other(store: JobStore, job_id: str, launcher: KubernetesLauncher) -> bool:
    """What another replica does once this one has been cut off for longer than a lease; False when this
    replica's own renewal came between the expiry and the take-over (then: try again)."""
    with store.db.write() as db:
        db.run("UPDATE jobs SET lease_expires = 1 WHERE id = :id AND lease_owner = 'me'", {"id": job_id})
    done = store.take_over_expired("other", 60.0, launcher.can_adopt)
    return [a.job.id for a in done.adopted] == [job_id]


@pytest.mark.timeout(120)
def test_a_replica_whose_trainjob_another_adopted_stops_watching_it_and_leaves_it_running(
    tmp_path: Path, postgres_database: str
) -> None:
    with running_standin() as api:
        cluster = Cluster(api, tmp_path, database_url=postgres_database, replica_id="me", lease_s=1.0)
        store = JobStore(postgres_database)
        scheduler = Scheduler(
            cluster.settings, store, cluster.launcher, intake_for(store, cluster.settings), ADVERTISED,
            poll_s=0.05,
        )  # fmt: skip
        scheduler.start()
        try:
            job = store.create_job(spec())
            scheduler.wake()
            (name,) = wait_for(lambda: list(api.trainjobs(NS)))
            wait_for(lambda: job.id in scheduler.running())
            wait_for(lambda: adopted_by_other(store, job.id, cluster.launcher))
            wait_for(lambda: job.id not in scheduler.running())  # its next renewal found it gone
            assert api.deletes("trainjobs") == [] and list(api.trainjobs(NS)) == [name]
            assert api.deletes("secrets") == []
            with store.db.read() as db:  # the adopter's grant is left to it: the worker may report on
                grant = db.one("SELECT replica FROM report_grants WHERE job_id = :j", {"j": job.id})
            assert grant is not None and grant["replica"] == "other"
        finally:
            scheduler.stop(drain=False)
            store.close()
            cluster.store.close()
