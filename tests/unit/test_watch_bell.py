"""WatchJob waits on the job's bell instead of polling the database per stream: a real SQLite store,
real threads. Each test would fail with the old 0.2 s poll loop or with a bell that does not ring."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.errors import FailedPrecondition
from service.jobs.store import JobStore
from service.jobs.watch import follow_events
from service.records import EventKind, JobState
from tests.store_backends import make_spec


@pytest.fixture
def store(tmp_path: Path) -> Any:
    made = JobStore(tmp_path / "jobs.sqlite3")
    yield made
    made.close()


class CountingStore:
    """The real store, counting the event reads a watcher makes."""

    def __init__(self, store: JobStore) -> None:
        self._store, self.reads = store, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def events_after(self, *args: Any, **kwargs: Any) -> Any:
        self.reads += 1
        return self._store.events_after(*args, **kwargs)


def _watch(
    store: Any, job_id: str, stop: threading.Event, **kwargs: Any
) -> tuple[list[Any], threading.Thread]:
    seen: list[Any] = []

    def run() -> None:
        for event, _ in follow_events(store, job_id, stop=stop, **kwargs):
            seen.append((time.monotonic(), event))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return seen, thread


def test_a_new_event_reaches_a_watcher_at_once_without_polling(store: JobStore) -> None:
    job = store.create_job(make_spec())
    stop = threading.Event()
    # a fallback of a minute: only the bell can deliver the event in time
    seen, thread = _watch(store, job.id, stop, fallback_s=60.0)
    time.sleep(0.3)
    sent = time.monotonic()
    store.append_event(job.id, EventKind.INFO, "hello")
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert [e.message for _, e in seen] == ["job queued", "hello"]
    assert seen[1][0] - sent < 1.0


def test_an_idle_watch_does_not_read_the_database_until_its_fallback(store: JobStore) -> None:
    job = store.create_job(make_spec())
    counting = CountingStore(store)
    stop = threading.Event()
    _, thread = _watch(counting, job.id, stop, fallback_s=30.0, stop_check_s=0.05)
    time.sleep(1.5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    # the first read only (the old loop read every 0.2 s: ~8 reads)
    assert counting.reads == 1


def test_a_watch_ends_soon_after_its_client_leaves(store: JobStore) -> None:
    job = store.create_job(make_spec())
    stop = threading.Event()
    _, thread = _watch(store, job.id, stop, fallback_s=60.0, stop_check_s=0.05)
    time.sleep(0.2)
    left = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - left < 1.0


def test_the_watch_ends_after_the_final_state_it_was_told_of(store: JobStore) -> None:
    job = store.create_job(make_spec())
    stop = threading.Event()
    seen, thread = _watch(store, job.id, stop, fallback_s=60.0)
    time.sleep(0.2)
    store.request_cancel(job.id)  # QUEUED -> CANCELLED at once
    thread.join(5)
    assert not thread.is_alive()
    assert seen[-1][1].data["state"] == JobState.CANCELLED


def test_a_refused_write_does_not_ring(store: JobStore) -> None:
    job = store.create_job(make_spec())
    before = store.bell.version(job.id)
    with pytest.raises(FailedPrecondition):
        store.transition(job.id, JobState.SUCCEEDED)  # QUEUED -> SUCCEEDED is not allowed
    assert store.bell.version(job.id) == before
    store.append_event(job.id, EventKind.INFO, "x")
    assert store.bell.version(job.id) == before + 1


def test_writes_this_process_cannot_hear_arrive_after_the_fallback(store: JobStore, tmp_path: Path) -> None:
    """Another store on the same database (as another replica would be) does not ring this bell."""
    job = store.create_job(make_spec())
    other = JobStore(tmp_path / "jobs.sqlite3")
    stop = threading.Event()
    seen, thread = _watch(store, job.id, stop, fallback_s=0.5)
    time.sleep(0.2)
    other.append_event(job.id, EventKind.INFO, "from elsewhere")
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    other.close()
    assert [e.message for _, e in seen] == ["job queued", "from elsewhere"]
