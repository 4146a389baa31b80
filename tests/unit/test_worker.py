"""The worker's pieces that need no training: stop requests, archive versions, one-line errors."""

from __future__ import annotations

import signal
from pathlib import Path

from service.errors import FailedPrecondition
from service.jobs.store import JobStore
from service.jobs.worker import StoreReporter, next_version, one_line
from service.records import EventKind, JobState
from service.spec import JobSpec


def running_job(tmp_path: Path) -> tuple[JobStore, str]:
    store = JobStore(tmp_path / "jobs.sqlite3")
    spec = JobSpec.model_validate({"name": "w", "model": {"architecture": "resnet18"}, "data": {"path": "d"}})
    job_id = store.create_job(spec).id
    store.transition(job_id, JobState.RUNNING)
    return store, job_id


def test_sigterm_means_draining_unless_a_cancel_was_requested(tmp_path: Path) -> None:
    store, job_id = running_job(tmp_path)
    reporter = StoreReporter(store, job_id)
    assert reporter.stop_requested() is None
    reporter.signal_stop(signal.SIGTERM)
    assert reporter.stop_requested() == "draining"
    cancelled = StoreReporter(store, job_id)
    store.request_cancel(job_id)
    cancelled.signal_stop(signal.SIGTERM)
    assert cancelled.stop_requested() == "cancelled"


def test_the_reporter_writes_events_and_results_into_the_store(tmp_path: Path) -> None:
    store, job_id = running_job(tmp_path)
    reporter = StoreReporter(store, job_id)
    reporter.event(EventKind.EPOCH, "epoch 1", {"epoch": 1})
    reporter.result(epochs_completed=1)
    assert store.events_after(job_id)[-1].data == {"epoch": 1}
    assert store.get_job(job_id).result.epochs_completed == 1


def test_the_next_archive_version_follows_the_highest_in_the_store(tmp_path: Path) -> None:
    assert next_version(tmp_path, "pets") == "1"
    for name in ("pets-v1.mar", "pets-v3.mar", "pets-extra-v9.mar", "cats-v7.mar"):
        (tmp_path / name).touch()
    assert next_version(tmp_path, "pets") == "4"


def test_an_error_becomes_one_line_with_its_type() -> None:
    assert one_line(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert one_line(FailedPrecondition("weights missing")) == "FailedPrecondition: weights missing"
    assert one_line(KeyError()) == "KeyError"
