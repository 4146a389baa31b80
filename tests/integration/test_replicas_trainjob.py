"""A replica killed with SIGKILL while its job trains as a TrainJob: once its lease runs out, the other
replica adopts the TrainJob, which trains on (no restart, the same attempt), and supervises it to the end.

Real: two `run_service()` processes on one PostgreSQL (tests/pg.py), the Kubernetes launcher through the
real `kubernetes` client, the reporting servers and the workers' reporting client. STAND-INS, as in
tests/unit/test_k8s_launcher.py: the API server (tests/k8s_api_standin.py), the Trainer controller and
kubelet (tests/k8s_pod_runner.py, one local process per TrainJob) and the worker (fake_worker.py). The
reporting Service in front of the replicas is played by the advertised address itself: every TrainJob
reports to replica b's reporting port, as a Service may route a worker's calls to any replica."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from harness import wait_for
from k8s_api_standin import StandInApiServer, running_standin, write_kubeconfig
from k8s_crds import crd_folder
from k8s_pod_runner import PodRunner
from reliability import record

from service.jobs.store import JobStore
from service.records import JobState
from service.spec import JobSpec
from tests.pg import once_back, postgres_of_its_own
from tests.ports import free_ports

pytest.importorskip("kubernetes", reason="the k8s extra (pip install 'tuneserve[k8s]')")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.reliability,
    pytest.mark.timeout(300),
    pytest.mark.skipif(crd_folder() is None, reason="no k8s-crds folder (see tests/k8s_crds.py)"),
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FAKE_WORKER = PROJECT_ROOT / "tests" / "unit" / "fake_worker.py"
NS = "ml-team"
LEASE_S = 3.0
SERVING_ON = re.compile(r"tuneserve is serving on [\d.]+:(\d+)")


@dataclass
class Replica:
    name: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.root / f"replica-{self.name}.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from service.app import run_service; run_service()"],
                cwd=PROJECT_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def serving() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"replica {self.name} exited at start: {log.read_text()[-3000:]}")
            return SERVING_ON.search(log.read_text()) is not None

        wait_for(serving, 120, f"replica {self.name} to start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL: no drain, no clean-up; its leases simply stop being renewed
            self.process.wait()


@dataclass
class Pair:
    a: Replica
    b: Replica
    api: StandInApiServer
    store: JobStore


@pytest.fixture
def pair(tmp_path: Path, postgres_database: str) -> Iterator[Pair]:
    with replicas_on(tmp_path, postgres_database) as made:
        yield made


@contextmanager
def replicas_on(tmp_path: Path, database_url: str) -> Iterator[Pair]:
    """Replicas a and b (not started) on the database, the stand-in cluster running their TrainJobs."""
    report_a, report_b = free_ports(2)
    with running_standin() as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESERVE_", "KUBERNETES_"))}
        base |= {
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": str(PROJECT_ROOT),
            "TUNESERVE_STATE_DIR": str(tmp_path / "state"),
            "TUNESERVE_DATABASE_URL": database_url,
            "TUNESERVE_LEASE_S": str(LEASE_S),
            "TUNESERVE_LAUNCHER": "kubernetes",
            "TUNESERVE_K8S_NAMESPACE": NS,
            "TUNESERVE_PORT": "0",
            "TUNESERVE_TORCHSERVE_ENABLED": "false",
            "TUNESERVE_REPORT_HOST": "0.0.0.0",
            "TUNESERVE_REPORT_ALLOW_PLAINTEXT": "true",
            # the reporting Service: whatever replica launched a TrainJob, its workers reach b
            "TUNESERVE_REPORT_ADVERTISE_ADDRESS": f"localhost:{report_b}",
            "TUNESERVE_REPORT_HEARTBEAT_S": "0.2",
            "TUNESERVE_REPORT_LOST_S": "60",  # until b is up, the worker waits for it
            "TUNESERVE_CANCEL_GRACE_S": "5",
        }
        a = Replica(
            "a", tmp_path, base | {"TUNESERVE_REPLICA_ID": "a", "TUNESERVE_REPORT_PORT": str(report_a)}
        )
        b = Replica(
            "b", tmp_path, base | {"TUNESERVE_REPLICA_ID": "b", "TUNESERVE_REPORT_PORT": str(report_b)}
        )
        store = JobStore(database_url)
        try:
            with PodRunner(api, NS, [sys.executable, str(FAKE_WORKER)]):
                yield Pair(a, b, api, store)
        finally:
            a.kill()
            b.kill()
            store.close()


def slow(name: str) -> JobSpec:
    """A two-node job whose stand-in worker trains until it is asked to stop."""
    return JobSpec.model_validate(
        {
            "name": name,
            "model": {"architecture": "resnet18"},
            "data": {"path": "ds"},
            "resources": {"nodes": 2, "gpus": 1},
        }
    )


def messages(store: JobStore, job_id: str) -> list[str]:
    return [e.message for e in store.events_after(job_id)]


class Training(NamedTuple):
    job_id: str
    name: str  # its TrainJob's
    uid: str  # ... which stays the same while it trains on (never deleted and created again)


def training_under_a(pair: Pair, job_name: str, *, with_b: bool = True) -> Training:
    """a (started here) claims a slow job and launches its TrainJob; b starts after the claim unless not
    `with_b`. Answered once the worker has made its first report."""
    pair.a.start()
    job_id = pair.store.create_job(slow(job_name)).id  # only a is up: a claims it
    (name,) = wait_for(lambda: list(pair.api.trainjobs(NS)), 60, "a's TrainJob")
    uid = pair.api.trainjobs(NS)[name]["metadata"]["uid"]
    if with_b:
        pair.b.start()
    wait_for(lambda: "fake worker started" in messages(pair.store, job_id), 60, "the worker's first report")
    return Training(job_id, name, uid)


def stopped_itself_for_the_cancel(pair: Pair, job_id: str) -> None:
    """The job ends CANCELLED in its first attempt: its one worker, told in its heartbeat reply, stopped
    itself (no kill)."""
    job = wait_for(lambda: (j := pair.store.get_job(job_id)).state.is_final and j, 60, "the job to stop")
    assert job.state == JobState.CANCELLED and job.attempts == 1
    stopping = [e for e in pair.store.events_after(job_id) if e.message == "fake worker stopping"]
    assert [e.data["reason"] for e in stopping] == ["cancelled"]
    assert messages(pair.store, job_id).count("fake worker started") == 1  # one worker, start to end


def deleted_by_b(pair: Pair, name: str) -> None:
    """b saw the TrainJob end and deleted it: nothing is left in the cluster."""
    wait_for(
        lambda: [r.name for r in pair.api.deletes("trainjobs")] == [name], 30, "b to delete the TrainJob"
    )
    assert not pair.api.trainjobs(NS)


def test_a_dead_replicas_trainjob_is_adopted_and_trains_on_to_the_end(pair: Pair) -> None:
    job_id, name, uid = training_under_a(pair, "slow-adopted")
    assert pair.store.lease_owner(job_id) == "a"

    pair.a.kill()
    wait_for(lambda: pair.store.lease_owner(job_id) == "b", 6 * LEASE_S, "b to adopt the job")
    adopted = [e for e in pair.store.events_after(job_id) if "adopted" in e.message]
    assert [e.data for e in adopted] == [{"adopted_by": "b", "from": "a"}]
    job = pair.store.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.RUNNING, 1)
    # the same TrainJob trains on: never deleted, never replaced, its worker never refused
    assert pair.api.deletes("trainjobs") == [] and pair.api.trainjobs(NS)[name]["metadata"]["uid"] == uid
    time.sleep(LEASE_S)  # b renews it: still its own, still running, nothing relaunched
    assert pair.store.lease_owner(job_id) == "b" and pair.store.get_job(job_id).state == JobState.RUNNING
    assert list(pair.api.trainjobs(NS)) == [name]

    # b supervises it now: a cancel reaches the worker through b's stop request in its heartbeat reply,
    # and b sees the TrainJob end and deletes it
    pair.store.request_cancel(job_id)
    stopped_itself_for_the_cancel(pair, job_id)
    deleted_by_b(pair, name)
    record(
        "fault",
        "SIGKILL of the replica watching a TrainJob, two replicas on PostgreSQL",
        1,
        "the other replica adopted it one lease later (lease and grant moved together): the same TrainJob "
        "and attempt trained on, its worker never refused; a cancel through the adopter stopped it",
    )


def test_a_replica_restarted_under_its_name_adopts_its_trainjob_again(pair: Pair) -> None:
    """A container restarted in its pod keeps its name (TUNESERVE_REPLICA_ID is the pod's): it finds its
    TrainJob still training and watches it again instead of deleting and relaunching it. Here the worker
    reports to a's own port, which a binds again when it restarts."""
    pair.a.env["TUNESERVE_REPORT_ADVERTISE_ADDRESS"] = f"localhost:{pair.a.env['TUNESERVE_REPORT_PORT']}"
    job_id, name, uid = training_under_a(pair, "slow-restarted", with_b=False)

    pair.a.kill()
    pair.a.start()
    wait_for(lambda: any("a restarted" in m for m in messages(pair.store, job_id)), 30, "a to adopt it again")
    job = pair.store.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.RUNNING, 1)
    assert pair.api.deletes("trainjobs") == [] and pair.api.trainjobs(NS)[name]["metadata"]["uid"] == uid

    pair.store.request_cancel(job_id)
    stopped_itself_for_the_cancel(pair, job_id)
    record(
        "fault",
        "SIGKILL of a replica watching a TrainJob, then the same replica (same name) started again",
        1,
        "it adopted its TrainJob again at start (grant kept): the same TrainJob and attempt trained on to "
        "a cancel",
    )


def test_a_replica_stopped_for_a_rolling_update_hands_its_trainjob_over(pair: Pair) -> None:
    """SIGTERM (a rolling update): instead of asking the TrainJob to checkpoint and stop, a offers it to
    the other replicas; b adopts it at its next look, and it trains on."""
    job_id, name, uid = training_under_a(pair, "slow-handed-over")

    assert pair.a.process is not None
    pair.a.process.send_signal(signal.SIGTERM)
    assert pair.a.process.wait(timeout=60) == 0
    assert pair.store.lease_owner(job_id) == "b"
    found = messages(pair.store, job_id)
    assert any("a is stopping" in m for m in found) and any("watched by b" in m for m in found)
    job = pair.store.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.RUNNING, 1)
    assert pair.api.deletes("trainjobs") == [] and pair.api.trainjobs(NS)[name]["metadata"]["uid"] == uid
    assert "fake worker stopping" not in found  # never asked to stop

    pair.store.request_cancel(job_id)
    job = wait_for(lambda: (j := pair.store.get_job(job_id)).state.is_final and j, 60, "the job to stop")
    assert job.state == JobState.CANCELLED and job.attempts == 1
    assert messages(pair.store, job_id).count("fake worker started") == 1
    record(
        "fault",
        "SIGTERM (rolling update) of a replica watching a TrainJob, another replica up",
        1,
        "it offered the TrainJob and exited 0 once the other adopted it: never asked to stop, the same "
        "TrainJob and attempt trained on",
    )


def test_a_cancel_asked_while_its_replica_is_dead_is_carried_out_by_the_adopter(pair: Pair) -> None:
    """The cancel lands while no replica watches the worker (a was killed, its lease not yet run out).
    A re-queue would only mark the job CANCELLED (its worker refused, the finished TrainJob never
    deleted); b adopts it instead and stops it as any cancel: the worker stops itself, and b deletes
    the TrainJob."""
    job_id, name, _ = training_under_a(pair, "slow-cancelled-unwatched")

    pair.a.kill()
    pair.store.request_cancel(job_id)  # through any replica: b's CancelJob writes the same
    stopped_itself_for_the_cancel(pair, job_id)
    assert any("asked to cancel, and is stopped from here" in m for m in messages(pair.store, job_id))
    deleted_by_b(pair, name)
    record(
        "fault",
        "SIGKILL of the replica watching a TrainJob, then a cancel before its lease ran out",
        1,
        "the other replica adopted it to carry the cancel out: the worker stopped itself and the TrainJob "
        "was deleted (before, the job was marked CANCELLED and the finished TrainJob left behind)",
    )


def test_a_replica_stopped_while_the_database_is_down_leaves_its_trainjob_training(
    tmp_path: Path,
) -> None:
    """SIGTERM while PostgreSQL is down: a cannot hand the job over, drain it or record anything. It exits
    0 at once, leaving the TrainJob training and the job leased to it; once the database is back, b
    adopts it when the lease has run out. Before, the drain raised UNAVAILABLE at its first write."""
    with postgres_of_its_own() as server, replicas_on(tmp_path, server.create_database("jobs")) as pair:
        job_id, name, uid = training_under_a(pair, "slow-store-away")

        server.stop()
        assert pair.a.process is not None
        pair.a.process.send_signal(signal.SIGTERM)
        assert pair.a.process.wait(timeout=30) == 0
        assert pair.api.deletes("trainjobs") == [] and pair.api.trainjobs(NS)[name]["metadata"]["uid"] == uid

        server.start()  # b rode out the outage
        once_back(lambda: pair.store.list_jobs((), 1, ""))  # the pool's first calls after the restart fail
        wait_for(lambda: pair.store.lease_owner(job_id) == "b", 6 * LEASE_S, "b to adopt the job")
        job = pair.store.get_job(job_id)
        assert (job.state, job.attempts) == (JobState.RUNNING, 1)
        assert pair.api.deletes("trainjobs") == [] and pair.api.trainjobs(NS)[name]["metadata"]["uid"] == uid
        assert "fake worker stopping" not in messages(pair.store, job_id)  # never asked to stop
    record(
        "fault",
        "SIGTERM of a replica watching a TrainJob while PostgreSQL is down",
        1,
        "it exited 0 at once, leaving the TrainJob training and the job leased to it; once the database "
        "was back the other replica adopted it (same TrainJob and attempt, never asked to stop)",
    )
