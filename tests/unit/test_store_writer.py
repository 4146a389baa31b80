"""The store's one writer per process: many threads writing at once, writes batched into one commit, and a
write that fails inside a batch rolled back alone with its own error. On each backend (raw sqlite3,
SQLite through SQLAlchemy, a real PostgreSQL: tests/store_backends.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from service.errors import FailedPrecondition, NotFound
from service.jobs.store import JobStore
from service.jobs.store_db import Conn
from service.jobs.store_rows import fetch_row, insert_event
from service.records import EventKind, JobState
from tests.store_backends import make_spec

THREADS = 16
PER_THREAD = 15


def test_many_threads_writing_at_once_all_succeed_with_gapless_event_numbers(store: JobStore) -> None:
    job = store.create_job(make_spec())
    start = threading.Barrier(THREADS)

    def write(k: int) -> list[int]:
        start.wait()
        created = store.create_job(make_spec(f"t{k}"), idempotency_key=f"key-{k}")
        assert store.create_job(make_spec(f"t{k}"), idempotency_key=f"key-{k}").id == created.id
        return [store.append_event(job.id, EventKind.INFO, f"{k}:{i}").seq for i in range(PER_THREAD)]

    with ThreadPoolExecutor(THREADS) as pool:
        seqs = list(pool.map(write, range(THREADS)))

    events = store.events_after(job.id)
    assert [e.seq for e in events] == list(range(1, 2 + THREADS * PER_THREAD))
    for k, mine in enumerate(seqs):
        assert mine == sorted(mine)  # each thread's events in the order it wrote them
        assert [events[s - 1].message for s in mine] == [f"{k}:{i}" for i in range(PER_THREAD)]
    names = {j.spec.name for j in store.list_jobs((), 100)[0]}
    assert names == {"job"} | {f"t{k}" for k in range(THREADS)}


def wait_for_backlog(store: JobStore, count: int) -> None:
    writer = store.db._writer  # type: ignore[attr-defined]  # both databases have one
    deadline = time.monotonic() + 30
    while writer.backlog() < count:
        assert time.monotonic() < deadline, f"only {writer.backlog()} of {count} writes queued"
        time.sleep(0.01)


def test_a_write_that_fails_in_a_batch_is_rolled_back_alone_with_its_own_error(store: JobStore) -> None:
    job = store.create_job(make_spec())
    held, release = threading.Event(), threading.Event()

    def hold(db: Conn) -> None:  # keeps the writer busy while the batch queues up behind it
        held.set()
        release.wait(30)

    def half_then_fail(db: Conn) -> None:
        insert_event(db, job.id, EventKind.INFO, "never seen", {}, time.time())
        raise ValueError("a bug after the first statement")

    def duplicate_event(db: Conn) -> None:  # a statement the database refuses (PostgreSQL then aborts
        db.run(  # the transaction, which only the savepoint recovers)
            "INSERT INTO events (job_id, seq, time, kind, message, data)"
            " VALUES (:id, 1, 0, 'INFO', 'dup', '{}')",
            {"id": job.id},
        )

    writes: list[Callable[[], Any]] = [
        lambda: store.append_event(job.id, EventKind.INFO, "a"),
        lambda: store.db.run_write(half_then_fail),
        lambda: store.append_event(job.id, EventKind.INFO, "b"),
        lambda: store.transition(job.id, JobState.SUCCEEDED),  # QUEUED -> SUCCEEDED is refused
        lambda: store.db.run_write(duplicate_event),
        lambda: store.append_event("job-missing", EventKind.INFO, "c"),
        lambda: store.append_event(job.id, EventKind.INFO, "d"),
    ]
    with ThreadPoolExecutor(len(writes) + 1) as pool:
        blocker = pool.submit(store.db.run_write, hold)
        assert held.wait(30)
        futures = []
        for write in writes:  # queued one by one, so the batch keeps this order
            futures.append(pool.submit(write))
            wait_for_backlog(store, len(futures))
        release.set()
        blocker.result(30)
        outcomes = [f.exception(30) for f in futures]

    assert [o is None for o in outcomes] == [True, False, True, False, False, False, True]
    assert isinstance(outcomes[1], ValueError) and "a bug" in str(outcomes[1])
    assert isinstance(outcomes[3], FailedPrecondition) and "cannot become SUCCEEDED" in str(outcomes[3])
    assert "IntegrityError" in type(outcomes[4]).__name__  # the driver's own error, unchanged
    assert isinstance(outcomes[5], NotFound) and "job-missing" in str(outcomes[5])
    events = store.events_after(job.id)
    assert [(e.seq, e.message) for e in events] == [(1, "job queued"), (2, "a"), (3, "b"), (4, "d")]
    assert store.get_job(job.id).state == JobState.QUEUED


def test_a_write_made_inside_a_write_joins_its_transaction(store: JobStore) -> None:
    job = store.create_job(make_spec())

    def outer(db: Conn) -> int:
        insert_event(db, job.id, EventKind.INFO, "outer", {}, time.time())
        return store.append_event(job.id, EventKind.INFO, "inner").seq  # would wait for itself if queued

    assert store.db.run_write(outer) == 3
    assert [e.message for e in store.events_after(job.id)] == ["job queued", "outer", "inner"]


def test_the_writer_restarts_after_close(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.close()
    with pytest.raises(FailedPrecondition):
        store.transition(job.id, JobState.SUCCEEDED)
    assert store.request_cancel(job.id).state == JobState.CANCELLED


def test_on_postgres_a_write_that_deadlocks_with_another_replicas_batch_runs_again_alone(
    postgres_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two stores on one PostgreSQL, as two replicas: each batch takes a lock the other's next write wants
    (a job's row; the creation lock). PostgreSQL aborts one of the two waits (a deadlock), and that write
    is rolled back alone and run again after its batch commits: every caller succeeds."""
    a, b = JobStore(postgres_database), JobStore(postgres_database)
    job = a.create_job(make_spec("x"))
    a_locked, b_locked = threading.Event(), threading.Event()

    def lock_row(db: Conn) -> None:
        fetch_row(db, job.id, lock=True)
        a_locked.set()
        assert b_locked.wait(10)

    def lock_creations(db: Conn) -> None:
        db.exclusive("tuneserve.create_job")
        b_locked.set()
        assert a_locked.wait(10)

    caplog.set_level(logging.INFO, logger="service.jobs.store_writer")
    try:
        with ThreadPoolExecutor(6) as pool:
            release = threading.Event()
            holding = [threading.Event(), threading.Event()]

            def hold(started: threading.Event) -> Callable[[Conn], None]:
                def work(db: Conn) -> None:
                    started.set()
                    release.wait(30)

                return work

            blockers = [pool.submit(s.db.run_write, hold(h)) for s, h in zip((a, b), holding, strict=True)]
            # each writer busy before the writes are queued: one that found its writer idle would run at
            # once, never in the batch the test builds (a flake on a loaded CI)
            assert all(h.wait(30) for h in holding)
            futures = []
            for store, first, second in (
                (a, lambda: a.db.run_write(lock_row), lambda: a.create_job(make_spec("from-a"))),
                (
                    b,
                    lambda: b.db.run_write(lock_creations),
                    lambda: b.append_event(job.id, EventKind.INFO, "b"),
                ),
            ):
                for k, write in enumerate((first, second)):
                    futures.append(pool.submit(write))
                    wait_for_backlog(store, k + 1)
            release.set()
            for f in blockers + futures:
                f.result(60)
        assert "runs again alone" in caplog.text
        assert [e.message for e in a.events_after(job.id)] == ["job queued", "b"]
        assert {j.spec.name for j in a.list_jobs()[0]} == {"x", "from-a"}
    finally:
        a.close()
        b.close()
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute("TRUNCATE events, jobs, write_probe RESTART IDENTITY")
