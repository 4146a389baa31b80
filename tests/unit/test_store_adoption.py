"""A dead replica's job whose worker runs on (a TrainJob) is adopted when its lease runs out: the lease
and the worker's report grant move to the adopting replica in one transaction, so the worker trains on
and its reports keep being taken; any other expired job is re-queued as before. On every backend
(tests/store_backends.py); PostgreSQL is real (tests/pg.py). Two stores and intakes on one database
stand for two replicas, as in test_store_grants.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store_grants import Replicas as GrantReplicas

from service.errors import Unauthenticated
from service.jobs.store import JobStore
from service.jobs.store_grants import SharedGrants
from service.records import EventKind, JobState

REF = "ml-team/tj-1"


def trainjob(ref: str) -> bool:
    """What the Kubernetes launcher adopts: a TrainJob's `namespace/name`, never a local pid."""
    return "/" in ref


class Replicas(GrantReplicas):
    """Replicas "a" (which launched the worker, then died) and "b", on the same database (the grants
    tests' pair, test_store_grants.Replicas)."""

    def launched_by_a(self, ref: str = REF, name: str = "job") -> tuple[str, str]:
        """A job claimed by "a", its worker `ref` launched with a grant; then "a" stops renewing."""
        job_id = self.claimed("a", name)
        token = self.a.issue(job_id)
        self.store.set_worker_ref(job_id, ref)
        return job_id, token


@pytest.fixture
def replicas(store_location: Path | str) -> Iterator[Replicas]:
    made = Replicas(store_location)
    yield made
    made.close()


def test_an_expired_trainjob_is_adopted_with_its_grant_and_trains_on(replicas: Replicas) -> None:
    job_id, token = replicas.launched_by_a()
    assert replicas.b.heartbeat(token, job_id) is None  # reports reach "b" (the reporting Service)
    replicas.expire(job_id)
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert done.requeued == [] and [(a.job.id, a.ref) for a in done.adopted] == [(job_id, REF)]
    job = replicas.store.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.RUNNING, 1)  # the same attempt: nothing restarted
    assert replicas.store.lease_owner(job_id) == "b" and replicas.store.worker_ref(job_id) == REF
    assert replicas.store.renew("b", 60.0) == [job_id]
    last = replicas.store.events_after(job_id)[-1]
    assert last.kind == EventKind.INFO and "adopted" in last.message
    assert last.data == {"adopted_by": "b", "from": "a"}
    # the worker's token works on, through either replica, and "b" now reads its silence and stops it
    assert replicas.a.heartbeat(token, job_id) is None
    assert replicas.b.has_called(job_id) and replicas.b.silent_for(job_id) < 5.0
    replicas.b.request_stop(job_id, "cancelled")
    assert replicas.a.heartbeat(token, job_id) == "cancelled"
    assert replicas.a.append_events(token, job_id, 0, [(EventKind.INFO, "still training", {})]) == 1


def test_the_dead_replica_learning_late_cannot_revoke_the_adopters_grant(replicas: Replicas) -> None:
    job_id, token = replicas.launched_by_a()
    replicas.expire(job_id)
    replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    replicas.a.revoke(job_id)  # "a" comes back, finds the job is not its own any more, and lets go
    assert replicas.b.heartbeat(token, job_id) is None
    replicas.b.revoke(job_id)  # the adopter's own revoke, at the worker's exit, does revoke it
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        replicas.a.heartbeat(token, job_id)


def test_between_the_expiry_and_a_take_over_the_worker_is_answered_then_refused_once_requeued(
    replicas: Replicas,
) -> None:
    """The grace that lets an adoption find its worker still training; a re-queue still refuses it."""
    job_id, token = replicas.launched_by_a(ref="4242")  # a local process: never adopted
    replicas.expire(job_id)
    assert replicas.b.heartbeat(token, job_id) is None  # expired, not taken over yet
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert done.adopted == [] and [j.id for j in done.requeued] == [job_id]
    assert replicas.store.get_job(job_id).attempts == 0  # refunded, as before
    with pytest.raises(Unauthenticated, match=r"watched this worker \(a\) no longer holds"):
        replicas.b.heartbeat(token, job_id)


def test_a_grantless_job_is_requeued_and_a_cancelled_one_adopted_for_the_adopter_to_stop(
    replicas: Replicas,
) -> None:
    """A cancel asked while no replica watched the worker: only an adopter can stop it (a re-queue would
    mark it CANCELLED and leave its TrainJob running), so it is adopted, still asked to cancel."""
    cancelled, token = replicas.launched_by_a(name="cancelled")
    replicas.store.request_cancel(cancelled)
    grantless, _ = replicas.launched_by_a(ref="ml-team/tj-2", name="grantless")
    replicas.a.revoke(grantless)  # its worker could not report to anyone
    for job_id in (cancelled, grantless):
        replicas.expire(job_id)
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert [(a.job.id, a.ref) for a in done.adopted] == [(cancelled, REF)]
    assert [(j.id, j.state) for j in done.requeued] == [(grantless, JobState.QUEUED)]
    job = replicas.store.get_job(cancelled)
    assert (job.state, job.cancel_requested, job.attempts) == (JobState.RUNNING, True, 1)
    assert replicas.store.lease_owner(cancelled) == "b"
    assert replicas.store.events_after(cancelled)[-1].message.endswith(
        "asked to cancel, and is stopped from here"
    )
    replicas.b.request_stop(cancelled, "cancelled")  # what b's scheduler does next: the worker hears it
    assert replicas.a.heartbeat(token, cancelled) == "cancelled"


def test_a_lease_renewed_before_the_take_over_is_left_alone(replicas: Replicas) -> None:
    job_id, _ = replicas.launched_by_a()
    replicas.expire(job_id)
    replicas.store.renew("a", 60.0)  # "a" was only slow
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert done.adopted == [] and done.requeued == []
    assert replicas.store.lease_owner(job_id) == "a"


def test_replicas_taking_over_at_once_adopt_each_job_once(store_location: Path | str) -> None:
    replicas = Replicas(store_location)
    try:
        ids = [replicas.launched_by_a(ref=f"ml-team/tj-{i}", name=f"j{i}")[0] for i in range(6)]
        for job_id in ids:
            replicas.expire(job_id)
        takers = {name: JobStore(store_location) for name in ("b", "c", "d")}
        adopted: dict[str, list[str]] = {}
        start = threading.Barrier(len(takers))

        def take(name: str) -> None:
            start.wait()
            done = takers[name].take_over_expired(name, 60.0, trainjob)
            adopted[name] = [a.job.id for a in done.adopted]

        threads = [threading.Thread(target=take, args=(name,)) for name in takers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        everyone = [job_id for taken in adopted.values() for job_id in taken]
        assert sorted(everyone) == sorted(ids)  # each once, none twice
        for name, taken in adopted.items():
            assert all(replicas.store.lease_owner(job_id) == name for job_id in taken)
        for store in takers.values():
            store.close()
    finally:
        replicas.close()


def test_an_adopted_lease_runs_out_again_when_the_adopter_dies_too(replicas: Replicas) -> None:
    job_id, token = replicas.launched_by_a()
    replicas.expire(job_id)
    replicas.stores["b"].take_over_expired("b", 0.05, trainjob)
    time.sleep(0.1)
    done = replicas.store.take_over_expired("c", 60.0, trainjob)
    assert [a.job.id for a in done.adopted] == [job_id]
    assert replicas.store.lease_owner(job_id) == "c"
    assert replicas.a.heartbeat(token, job_id) is None
    assert replicas.store.get_job(job_id).attempts == 1


def test_a_replica_restarted_under_its_name_adopts_its_own_trainjob_again(replicas: Replicas) -> None:
    """A container restarted in its pod keeps the pod's name (TUNESERVE_REPLICA_ID): its TrainJobs are
    watched again (one to train on, one to stop for its cancel), and only its local worker's job is left
    to the re-queue, its grant forgotten."""
    job_id, token = replicas.launched_by_a()
    local_id, local_token = replicas.launched_by_a(ref="4242", name="local")
    cancelled, _ = replicas.launched_by_a(ref="ml-team/tj-3", name="cancelled")
    replicas.store.request_cancel(cancelled)
    again = replicas.stores["b"].adopt_own("a", 60.0, trainjob)
    # the cancelled one too: its TrainJob is stopped by the restarted replica, as any cancel
    assert [(a.job.id, a.ref) for a in again] == [(job_id, REF), (cancelled, "ml-team/tj-3")]
    assert again[0].job.attempts == 1 and again[1].job.cancel_requested
    last = replicas.store.events_after(job_id)[-1]
    assert "a restarted" in last.message and last.data == {"adopted_by": "a", "from": "a"}
    restarted = SharedGrants(replicas.stores["b"], "a")
    assert restarted.forget_predecessor(keep=[job_id, cancelled]) == 1  # the local job's
    assert replicas.b.heartbeat(token, job_id) is None
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        replicas.b.heartbeat(local_token, local_id)
    assert replicas.stores["b"].adopt_own("b", 60.0, trainjob) == []  # never another replica's


def test_a_stopping_replica_offers_its_trainjob_and_another_adopts_it(replicas: Replicas) -> None:
    job_id, token = replicas.launched_by_a()
    assert replicas.store.offer_lease(job_id, "a")
    assert replicas.store.take_over_expired("a", 60.0, trainjob).adopted == []  # never one's own
    assert replicas.b.heartbeat(token, job_id) is None  # offered: the worker is still answered
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert [a.job.id for a in done.adopted] == [job_id]
    assert not replicas.store.reclaim_lease(job_id, "a", 60.0, "too late")  # adopted meanwhile
    assert replicas.store.lease_owner(job_id) == "b" and replicas.store.get_job(job_id).attempts == 1
    offered = [e for e in replicas.store.events_after(job_id) if "offered" in e.message]
    assert [e.data for e in offered] == [{"offered_by": "a"}]


def test_an_offer_nobody_took_is_reclaimed_and_a_cancelled_job_is_never_offered(replicas: Replicas) -> None:
    job_id, _ = replicas.launched_by_a()
    cancelled, _ = replicas.launched_by_a(ref="ml-team/tj-2", name="cancelled")
    replicas.store.request_cancel(cancelled)
    assert not replicas.store.offer_lease(cancelled, "a")
    assert not replicas.store.offer_lease(job_id, "b")  # not b's to offer
    assert replicas.store.offer_lease(job_id, "a")
    assert replicas.store.reclaim_lease(job_id, "a", 60.0, "nobody adopted it: drained instead")
    assert replicas.stores["b"].take_over_expired("b", 60.0, trainjob).adopted == []  # a's again
    assert replicas.store.events_after(job_id)[-1].message == "nobody adopted it: drained instead"


def test_an_adoption_drops_the_old_replicas_drain_and_keeps_a_cancel(replicas: Replicas) -> None:
    """A drain is the stopping replica's own business: the adopter's worker trains on. A cancel is the
    job's: it still reaches the worker."""
    drained, drained_token = replicas.launched_by_a(name="drained")
    cancelled, cancelled_token = replicas.launched_by_a(ref="ml-team/tj-2", name="cancelled")
    replicas.a.request_stop(drained, "draining")
    replicas.store.request_cancel(cancelled)
    replicas.a.request_stop(cancelled, "cancelled")
    for job_id in (drained, cancelled):
        replicas.expire(job_id)
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert sorted(a.job.id for a in done.adopted) == sorted([drained, cancelled])
    assert replicas.b.heartbeat(drained_token, drained) is None
    assert replicas.b.heartbeat(cancelled_token, cancelled) == "cancelled"


def test_a_drain_the_worker_was_told_before_the_adoption_stays_and_the_adopter_learns_it_stops(
    replicas: Replicas,
) -> None:
    """A worker told of the drain in a heartbeat reply stops all the same: its drain stays, and the
    adoption says so (the adopter then re-queues the job at its exit as a drain, not a crash). One that
    was not told (its calls since were no heartbeats) trains on, as above."""
    told, told_token = replicas.launched_by_a(name="told")
    untold, untold_token = replicas.launched_by_a(ref="ml-team/tj-2", name="untold")
    for job_id in (told, untold):
        replicas.a.request_stop(job_id, "draining")
    assert replicas.b.heartbeat(told_token, told) == "draining"  # told through any replica
    assert replicas.a.append_events(untold_token, untold, 0, [(EventKind.INFO, "epoch 1", {})]) == 1
    for job_id in (told, untold):
        replicas.expire(job_id)
    done = replicas.stores["b"].take_over_expired("b", 60.0, trainjob)
    assert {a.job.id: a.drained for a in done.adopted} == {told: True, untold: False}
    assert replicas.b.heartbeat(told_token, told) == "draining"  # it is stopping: nothing contradicts it
    assert replicas.b.heartbeat(untold_token, untold) is None
    assert "told its replica's drain" in replicas.store.events_after(told)[-1].message
    assert "drain" not in replicas.store.events_after(untold)[-1].message


def test_a_replica_restarted_under_its_name_learns_which_of_its_trainjobs_heard_its_drain(
    replicas: Replicas,
) -> None:
    told, told_token = replicas.launched_by_a(name="told")
    untold, _ = replicas.launched_by_a(ref="ml-team/tj-2", name="untold")
    for job_id in (told, untold):
        replicas.a.request_stop(job_id, "draining")
    assert replicas.a.heartbeat(told_token, told) == "draining"
    adopted = replicas.stores["a"].adopt_own("a", 60.0, trainjob)
    assert {a.job.id: a.drained for a in adopted} == {told: True, untold: False}
