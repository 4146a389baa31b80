"""Claiming jobs with leases: each queued job goes to one replica, leases are renewed by heartbeats, and
a job whose lease ran out goes back to the queue. On every backend (tests/store_backends.py); several
"replicas" are several store instances (threads) or processes on the same database."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import psycopg
import pytest

from service.jobs.store import JobStore
from service.records import EventKind, JobState
from tests.store_backends import make_spec


def test_a_claim_takes_the_oldest_queued_job_and_leases_it(store: JobStore) -> None:
    first, _second = (store.create_job(make_spec(n)) for n in ("a", "b"))
    claimed = store.claim_next("replica-1", lease_s=30)
    assert claimed is not None and claimed.id == first.id
    assert (claimed.state, claimed.attempts) == (JobState.RUNNING, 1)
    last = store.events_after(first.id)[-1]
    assert (last.kind, last.data["state"], last.data["reason"]) == (
        EventKind.STATE,
        "RUNNING",
        "claimed by replica-1",
    )


def test_a_claim_skips_excluded_jobs_and_returns_none_when_nothing_is_queued(store: JobStore) -> None:
    first, second = (store.create_job(make_spec(n)) for n in ("a", "b"))
    claimed = store.claim_next("r", 30, exclude=[first.id])
    assert claimed is not None and claimed.id == second.id
    assert store.claim_next("r", 30, exclude=[first.id]) is None
    assert store.claim_next("r", 30) is not None
    assert store.claim_next("r", 30) is None


def test_replicas_claiming_at_once_each_get_different_jobs(store_location: Path | str) -> None:
    seed = JobStore(store_location)
    ids = {seed.create_job(make_spec(f"j{i}")).id for i in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()

    def replica(name: str) -> None:
        own = JobStore(store_location)
        while (job := own.claim_next(name, 30)) is not None:
            with lock:
                claimed.append(job.id)
        own.close()

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert all(j.attempts == 1 for j in seed.jobs_in([JobState.RUNNING]))
    seed.close()


def test_an_expired_lease_requeues_the_job_with_its_attempt_refunded(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.claim_next("dead-replica", lease_s=0.05)
    time.sleep(0.1)
    [requeued] = store.requeue_expired()
    assert (requeued.id, requeued.state, requeued.attempts) == (job.id, JobState.QUEUED, 0)
    *_, state, info = store.events_after(job.id)
    assert state.data["state"] == "QUEUED" and "dead-replica" in state.data["reason"]
    assert info.kind == EventKind.INFO and "resumes from its last checkpoint" in info.message
    again = store.claim_next("live-replica", 30)
    assert again is not None and again.id == job.id and again.attempts == 1


def test_a_renewed_lease_is_not_requeued(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.claim_next("r1", lease_s=0.05)
    assert store.renew("r1", lease_s=30) == [job.id]
    time.sleep(0.1)
    assert store.requeue_expired() == []
    assert store.get_job(job.id).state == JobState.RUNNING


def test_renewing_names_only_the_replicas_own_jobs(store: JobStore) -> None:
    mine, theirs = (store.create_job(make_spec(n)) for n in ("a", "b"))
    store.claim_next("me", 30)
    store.claim_next("them", 30)
    assert store.renew("me", 30) == [mine.id]
    assert store.renew("them", 30) == [theirs.id]
    assert store.renew("nobody", 30) == []


def test_a_job_that_left_running_has_no_lease_to_expire(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.claim_next("r1", lease_s=0.05)
    store.transition(job.id, JobState.FAILED, "broken")
    time.sleep(0.1)
    assert store.requeue_expired() == []
    assert store.renew("r1", 30) == []
    assert store.get_job(job.id).state == JobState.FAILED


def test_an_expired_job_whose_cancel_was_asked_is_cancelled_not_requeued(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.claim_next("r1", lease_s=0.05)
    store.request_cancel(job.id)
    time.sleep(0.1)
    [cancelled] = store.requeue_expired()
    assert (cancelled.id, cancelled.state) == (job.id, JobState.CANCELLED)


def test_a_job_running_without_a_lease_never_expires(store: JobStore) -> None:
    """The single-replica scheduler's path (next_queued + transition) holds no lease."""
    job = store.create_job(make_spec())
    store.transition(job.id, JobState.RUNNING)
    assert store.requeue_expired() == []


def _claim_all(location: Path | str, replica: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = JobStore(location)
    while (job := store.claim_next(replica, 30)) is not None:
        queue.put(job.id)
    store.close()


@pytest.mark.slow
def test_processes_claiming_at_once_run_each_job_exactly_once(store_location: Path | str) -> None:
    seed = JobStore(store_location)
    ids = {seed.create_job(make_spec(f"j{i}")).id for i in range(30)}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_claim_all, args=(store_location, f"r{i}", queue)) for i in range(3)]
    for w in workers:
        w.start()
    claimed = [queue.get(timeout=120) for _ in ids]
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert sorted(claimed) == sorted(ids)
    seed.close()


def test_on_postgres_a_claim_skips_a_row_another_replica_holds(postgres_database: str) -> None:
    """FOR UPDATE SKIP LOCKED: a claim does not wait for (or take) a job locked by another transaction."""
    store = JobStore(postgres_database)
    try:
        first, second = (store.create_job(make_spec(n)) for n in ("a", "b"))
        with psycopg.connect(postgres_database) as other:  # a transaction holding the oldest job's row
            other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
            claimed = store.claim_next("r1", 30)
            assert claimed is not None and claimed.id == second.id
        assert store.get_job(first.id).state == JobState.QUEUED
    finally:
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute("TRUNCATE events, jobs, write_probe RESTART IDENTITY")
        store.close()
