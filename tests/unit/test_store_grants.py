"""Report grants in the job store (service.jobs.store_grants), on each backend (tests/store_backends.py):
two intakes on one database stand for two replicas; the worker's calls go to the one that did not launch
it. PostgreSQL is real (tests/pg.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.errors import InvalidArgument, PermissionDenied, Unauthenticated
from service.jobs.intake import Intake
from service.jobs.store import JobStore
from service.jobs.store_grants import SharedGrants
from service.records import EventKind, JobState
from tests.store_backends import make_spec

LEASE_S = 60.0


class Replicas:
    """Replicas "a" and "b": a store and an intake each, on the same database."""

    def __init__(self, location: Path | str) -> None:
        self.stores = {name: JobStore(location) for name in ("a", "b")}
        self.a = Intake(self.stores["a"], SharedGrants(self.stores["a"], "a", touch_s=60.0))
        self.b = Intake(self.stores["b"], SharedGrants(self.stores["b"], "b", touch_s=60.0))
        self.store = self.stores["a"]

    def claimed(self, by: str, name: str = "job") -> str:
        job_id = self.store.create_job(make_spec(name)).id
        job = self.stores[by].claim_next(by, LEASE_S)
        assert job is not None and job.id == job_id
        return job_id

    def expire(self, job_id: str) -> None:
        with self.store.db.write() as db:
            db.run("UPDATE jobs SET lease_expires = 0 WHERE id = :id", {"id": job_id})

    def close(self) -> None:
        for store in self.stores.values():
            with store.db.write() as db:
                db.run("DELETE FROM report_grants")  # PostgreSQL: the module's database is shared
            store.close()


@pytest.fixture
def replicas(store_location: Path | str) -> Iterator[Replicas]:
    made = Replicas(store_location)
    yield made
    made.close()


def infos(r: Replicas, job_id: str) -> list[str]:
    return [e.message for e in r.store.events_after(job_id) if e.kind == EventKind.INFO]


def test_a_report_to_the_replica_that_did_not_launch_the_worker_lands_in_the_job(replicas: Replicas) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    first = [(EventKind.INFO, "one", {}), (EventKind.INFO, "two", {"n": 2})]
    assert replicas.b.append_events(token, job_id, 0, first) == 2
    # a retried batch with one more: only the new one is stored, wherever the retry lands
    assert replicas.a.append_events(token, job_id, 0, [*first, (EventKind.INFO, "three", {})]) == 3
    assert infos(replicas, job_id) == ["one", "two", "three"]
    assert replicas.b.heartbeat(token, job_id) is None
    assert replicas.b.assignment(token, job_id).id == job_id
    replicas.b.merge_result(token, job_id, {"archive_path": "/x.mar"})
    assert replicas.b.move(token, job_id, JobState.PACKAGING, "trained").state == JobState.PACKAGING
    assert replicas.store.get_job(job_id).result.archive_path == "/x.mar"


def test_a_gap_in_event_numbers_is_refused_on_any_replica(replicas: Replicas) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    with pytest.raises(InvalidArgument, match=r"events from number 3 .* 0 is the next one expected"):
        replicas.b.append_events(token, job_id, 3, [(EventKind.INFO, "late", {})])


def test_another_jobs_token_is_denied_and_an_unknown_or_revoked_one_unauthenticated(
    replicas: Replicas,
) -> None:
    mine, other = replicas.claimed("a", "mine"), replicas.claimed("a", "other")
    token = replicas.a.issue(mine)
    replicas.a.issue(other)
    with pytest.raises(PermissionDenied, match="belongs to another job"):
        replicas.b.heartbeat(token, other)
    with pytest.raises(PermissionDenied):
        replicas.b.append_events(token, other, 0, [(EventKind.INFO, "x", {})])
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        replicas.b.heartbeat("made-up", mine)
    replicas.a.revoke(mine)
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        replicas.b.heartbeat(token, mine)
    assert infos(replicas, other) == []


def test_a_relaunch_elsewhere_refuses_the_old_token_and_the_old_replica_cannot_revoke_the_new(
    replicas: Replicas,
) -> None:
    job_id = replicas.claimed("a")
    old = replicas.a.issue(job_id)
    replicas.expire(job_id)
    assert [j.id for j in replicas.store.requeue_expired()] == [job_id]
    assert replicas.stores["b"].claim_next("b", LEASE_S) is not None
    new = replicas.b.issue(job_id)
    for intake in (replicas.a, replicas.b):
        with pytest.raises(Unauthenticated):
            intake.heartbeat(old, job_id)
    replicas.a.revoke(job_id)  # "a" learns late that its worker is gone: the grant of "b"'s stays
    assert replicas.a.heartbeat(new, job_id) is None
    assert replicas.a.append_events(new, job_id, 0, [(EventKind.INFO, "resumed", {})]) == 1


def test_once_the_launching_replicas_lease_ran_out_and_the_job_was_requeued_its_worker_is_refused(
    replicas: Replicas,
) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    assert replicas.b.heartbeat(token, job_id) is None
    replicas.expire(job_id)
    assert replicas.b.heartbeat(token, job_id) is None  # until another replica takes the job over
    assert [j.id for j in replicas.store.requeue_expired()] == [job_id]
    with pytest.raises(Unauthenticated, match=r"watched this worker \(a\) no longer holds"):
        replicas.b.heartbeat(token, job_id)


def test_a_stop_asked_on_the_launching_replica_is_in_the_heartbeat_reply_of_the_other(
    replicas: Replicas,
) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    replicas.b.request_stop(job_id, "draining")  # "b" launched nothing for it: not its worker to stop
    assert replicas.b.heartbeat(token, job_id) is None
    replicas.a.request_stop(job_id, "cancelled")
    replicas.a.request_stop(job_id, "draining")  # the first reason stays
    assert replicas.b.heartbeat(token, job_id) == "cancelled"
    with pytest.raises(ValueError, match="use one of"):
        replicas.a.request_stop(job_id, "bored")


def test_the_launching_replica_reads_first_call_and_silence_from_the_store(replicas: Replicas) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    assert not replicas.a.has_called(job_id)
    assert replicas.a.silent_for(job_id) < 5.0
    with replicas.store.db.write() as db:
        db.run("UPDATE report_grants SET last_seen = last_seen - 100")
    assert replicas.a.silent_for(job_id) >= 100.0
    replicas.b.heartbeat(token, job_id)
    assert replicas.a.has_called(job_id)
    assert replicas.a.silent_for(job_id) < 5.0
    assert replicas.b.silent_for(job_id) == 0.0 and not replicas.b.has_called(job_id)  # not b's worker


def test_heartbeats_are_written_at_most_once_per_touch_interval(replicas: Replicas) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    replicas.b.heartbeat(token, job_id)  # the first call is written at once
    with replicas.store.db.write() as db:
        db.run("UPDATE report_grants SET last_seen = 1")
    replicas.b.heartbeat(token, job_id)  # within b's 60 s: not written again
    assert replicas.a.silent_for(job_id) > 1e6
    replicas.a.heartbeat(token, job_id)  # "a" has not written it yet: it does (its first touch)
    assert replicas.a.silent_for(job_id) < 5.0


def test_a_restarted_replica_forgets_the_grants_its_predecessor_of_that_name_issued(
    replicas: Replicas,
) -> None:
    job_id = replicas.claimed("a")
    token = replicas.a.issue(job_id)
    other = replicas.claimed("b", "other")
    kept = replicas.b.issue(other)
    restarted = SharedGrants(replicas.stores["b"], "a")
    assert restarted.forget_predecessor() == 1
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        replicas.b.heartbeat(token, job_id)  # its worker stops; the new "a" stops and re-queues the job
    assert replicas.a.heartbeat(kept, other) is None  # another replica's worker reports on
