"""The job store: idempotent creation, paging, the state machine, events, results, several processes.

Every test runs on each backend: raw sqlite3 (the default), SQLite through SQLAlchemy (a
`sqlite:///` URL), and a real PostgreSQL cluster (tests/pg.py) through SQLAlchemy and psycopg.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service.jobs.store import JobStore
from service.records import EventKind, JobState
from tests.store_backends import make_spec


def test_a_new_job_is_queued_with_a_first_state_event(store: JobStore) -> None:
    job = store.create_job(make_spec())
    assert job.state == JobState.QUEUED and job.attempts == 0
    [event] = store.events_after(job.id)
    assert (event.seq, event.kind, event.data["state"]) == (1, EventKind.STATE, "QUEUED")


def test_the_same_idempotency_key_and_spec_return_the_same_job(store: JobStore) -> None:
    first = store.create_job(make_spec(), "key-1")
    again = store.create_job(make_spec(), "key-1")
    assert again.id == first.id
    assert len(store.list_jobs()[0]) == 1


def test_the_same_idempotency_key_with_another_spec_is_already_exists(store: JobStore) -> None:
    first = store.create_job(make_spec(), "key-1")
    with pytest.raises(AlreadyExists, match=f"key-1.*{first.id}"):
        store.create_job(make_spec(epochs=3), "key-1")


def test_a_full_queue_is_resource_exhausted(store: JobStore) -> None:
    store.create_job(make_spec("a"), max_queued=2)
    store.create_job(make_spec("b"), max_queued=2)
    with pytest.raises(ResourceExhausted, match="2 jobs are already queued"):
        store.create_job(make_spec("c"), max_queued=2)


def test_an_unknown_job_is_not_found_naming_its_id(store: JobStore) -> None:
    with pytest.raises(NotFound, match="job-nope"):
        store.get_job("job-nope")


def test_list_jobs_pages_newest_first_and_filters_by_state(store: JobStore) -> None:
    ids = [store.create_job(make_spec(f"j{i}")).id for i in range(5)]
    store.request_cancel(ids[1])
    page1, token = store.list_jobs(page_size=2)
    page2, token2 = store.list_jobs(page_size=2, page_token=token)
    page3, token3 = store.list_jobs(page_size=2, page_token=token2)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1]
    assert token3 == ""
    queued, _ = store.list_jobs(states=[JobState.QUEUED])
    assert [j.id for j in queued] == [ids[4], ids[3], ids[2], ids[0]]


@pytest.mark.parametrize("token", ["garbage", "djE6YWJj", "!!"])
def test_a_page_token_we_did_not_issue_is_invalid(store: JobStore, token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list_jobs(page_token=token)


def test_the_happy_path_transitions_record_state_events_and_times(store: JobStore) -> None:
    job = store.create_job(make_spec())
    running = store.transition(job.id, JobState.RUNNING)
    store.transition(job.id, JobState.PACKAGING)
    done = store.transition(job.id, JobState.SUCCEEDED, "served")
    assert running.attempts == 1 and running.started_at is not None
    assert done.state == JobState.SUCCEEDED and done.finished_at is not None
    states = [e.data["state"] for e in store.events_after(job.id) if e.kind == EventKind.STATE]
    assert states == ["QUEUED", "RUNNING", "PACKAGING", "SUCCEEDED"]


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ([], JobState.PACKAGING),
        ([], JobState.SUCCEEDED),
        ([JobState.RUNNING], JobState.SUCCEEDED),
        ([JobState.CANCELLED], JobState.QUEUED),
        ([JobState.RUNNING, JobState.FAILED], JobState.RUNNING),
    ],
)
def test_a_transition_outside_the_state_machine_is_refused(
    store: JobStore, path: list[JobState], target: JobState
) -> None:
    job = store.create_job(make_spec())
    for state in path:
        store.transition(job.id, state)
    with pytest.raises(FailedPrecondition, match=f"cannot become {target}"):
        store.transition(job.id, target)


def test_failed_records_the_reason_as_the_error(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.transition(job.id, JobState.RUNNING)
    failed = store.transition(job.id, JobState.FAILED, "worker killed by SIGKILL (exit -9), 3 attempts")
    assert failed.error == "worker killed by SIGKILL (exit -9), 3 attempts"


def test_cancelling_a_queued_job_cancels_it_at_once(store: JobStore) -> None:
    job = store.request_cancel(store.create_job(make_spec()).id)
    assert job.state == JobState.CANCELLED and job.cancel_requested


def test_cancelling_a_running_job_only_marks_it(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.transition(job.id, JobState.RUNNING)
    marked = store.request_cancel(job.id)
    assert marked.state == JobState.RUNNING and marked.cancel_requested


def test_cancelling_a_finished_job_is_a_failed_precondition(store: JobStore) -> None:
    job = store.request_cancel(store.create_job(make_spec()).id)
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        store.request_cancel(job.id)


def test_interrupted_jobs_are_requeued_with_their_attempt_refunded(store: JobStore) -> None:
    running = store.create_job(make_spec("a"))
    store.transition(running.id, JobState.RUNNING)
    packaging = store.create_job(make_spec("b"))
    store.transition(packaging.id, JobState.RUNNING)
    store.transition(packaging.id, JobState.PACKAGING)
    cancelled = store.create_job(make_spec("c"))
    store.transition(cancelled.id, JobState.RUNNING)
    store.request_cancel(cancelled.id)
    requeued = store.requeue_interrupted()
    assert {j.id for j in requeued} == {running.id, packaging.id}
    assert all(j.state == JobState.QUEUED and j.attempts == 0 for j in requeued)
    assert store.get_job(cancelled.id).state == JobState.CANCELLED
    assert store.events_after(running.id)[-1].kind == EventKind.INFO


def test_results_merge(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.update_result(job.id, best_epoch=2, metrics={"val_loss": 0.5})
    store.update_result(job.id, archive_path=Path("/m/x.mar"), class_names=("a", "b"))
    result = store.get_job(job.id).result
    assert (result.best_epoch, result.metrics, result.archive_path) == (2, {"val_loss": 0.5}, "/m/x.mar")
    assert result.class_names == ("a", "b")


def test_an_unknown_result_field_is_a_programming_error(store: JobStore) -> None:
    job = store.create_job(make_spec())
    with pytest.raises(ValueError, match="nonsense"):
        store.update_result(job.id, nonsense=1)


def test_events_after_a_sequence_number_are_the_rest_in_order(store: JobStore) -> None:
    job = store.create_job(make_spec())
    for i in range(5):
        store.append_event(job.id, EventKind.PROGRESS, f"step {i}", {"step": i})
    assert [e.seq for e in store.events_after(job.id, 3)] == [4, 5, 6]
    assert store.events_after(job.id, 6) == []


def test_the_state_at_a_sequence_number_follows_the_state_events(store: JobStore) -> None:
    job = store.create_job(make_spec())
    store.append_event(job.id, EventKind.INFO, "hello")
    store.transition(job.id, JobState.RUNNING)
    store.append_event(job.id, EventKind.INFO, "working")
    assert [store.state_at(job.id, seq) for seq in (1, 2, 3, 4)] == ["QUEUED", "QUEUED", "RUNNING", "RUNNING"]


def _open(target: Path | str) -> JobStore:
    return JobStore(target)


def _append_many(target: Path | str, job_id: str, count: int) -> None:
    store = _open(target)
    for i in range(count):
        store.append_event(job_id, EventKind.PROGRESS, f"step {i}")
    store.close()


def test_processes_appending_at_once_get_distinct_gapless_sequence_numbers(
    store_location: Path | str,
) -> None:
    store = JobStore(store_location)
    job = store.create_job(make_spec())
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(store_location, job.id, 40)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert [e.seq for e in store.events_after(job.id)] == list(range(1, 122))
    store.close()


def test_jobs_and_events_survive_reopening(store_location: Path | str) -> None:
    first = JobStore(store_location)
    job = first.create_job(make_spec(), "k")
    first.append_event(job.id, EventKind.INFO, "remember me", {"x": [1, 2]})
    first.close()
    second = JobStore(store_location)
    assert second.get_job(job.id) == job
    assert second.events_after(job.id)[-1].data == {"x": [1, 2]}
    second.close()
