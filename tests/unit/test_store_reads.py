"""The store's read path decodes each version of a job's row once: an unchanged job comes back as the same
object, and any write is seen at once (never an earlier version). On each backend (tests/store_backends.py).
"""

from __future__ import annotations

from service.jobs.store import JobStore
from service.records import JobState
from tests.store_backends import make_spec


def test_an_unchanged_job_read_again_is_the_same_object(store: JobStore) -> None:
    job = store.create_job(make_spec())
    assert store.get_job(job.id) is store.get_job(job.id)
    [listed] = store.list_jobs()[0]
    assert listed is store.get_job(job.id)


def test_a_cancel_is_seen_by_the_next_get_and_list(store: JobStore) -> None:
    job = store.create_job(make_spec())
    before = store.get_job(job.id)
    store.list_jobs()
    store.request_cancel(job.id)
    after = store.get_job(job.id)
    assert (before.state, after.state, after.cancel_requested) == (JobState.QUEUED, JobState.CANCELLED, True)
    assert [j.state for j in store.list_jobs()[0]] == [JobState.CANCELLED]


def test_a_result_written_is_seen_by_the_next_read(store: JobStore) -> None:
    job = store.create_job(make_spec())
    assert store.get_job(job.id).result.best_metric is None
    store.update_result(job.id, best_metric=0.5)
    assert store.get_job(job.id).result.best_metric == 0.5
    store.update_result(job.id, best_metric=0.75)
    assert store.list_jobs()[0][0].result.best_metric == 0.75
