"""The worker's pieces that need no training: stop requests, archive versions, one-line errors.

The reporter is the real one (service.api.report_client) against a real reporting server on loopback.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability import record

from service.api.report_client import GrpcReporter
from service.api.reporting_server import start_reporting_server
from service.errors import FailedPrecondition
from service.jobs.intake import Intake
from service.jobs.launcher import EXIT_FAILED
from service.jobs.store import JobStore
from service.jobs.worker import BUILT_ARCHIVE, one_line, package, run_job
from service.records import EventKind, Job, JobState
from service.settings import Settings
from service.spec import JobSpec
from service.training.distributed import Ranks
from service.training.reporting import CollectingReporter


class Plane:
    """A control plane's reporting side: store, intake, server; one RUNNING job."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = JobStore(tmp_path / "jobs.sqlite3")
        self.intake = Intake(self.store)
        self.server = start_reporting_server(Settings(state_dir=tmp_path), self.intake)
        spec = JobSpec.model_validate(
            {"name": "w", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
        )
        self.job_id = self.store.create_job(spec).id
        self.store.transition(self.job_id, JobState.RUNNING)

    def reporter(self) -> GrpcReporter:
        token = self.intake.issue(self.job_id)
        return GrpcReporter(self.server.address, token, self.job_id, heartbeat_s=0.05).start()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    made = Plane(tmp_path)
    yield made
    made.server.stop(0)
    made.store.close()


def test_sigterm_means_draining_unless_a_cancel_was_requested(plane: Plane) -> None:
    reporter = plane.reporter()
    assert reporter.stop_requested() is None
    reporter.signal_stop(signal.SIGTERM)
    assert reporter.stop_requested() == "draining"
    reporter.close()
    cancelled = plane.reporter()
    plane.intake.request_stop(plane.job_id, "cancelled")  # what the scheduler does before its SIGTERM
    cancelled.signal_stop(signal.SIGTERM)
    assert cancelled.stop_requested() == "cancelled"
    cancelled.close()


def test_the_reporter_writes_events_and_results_into_the_store(plane: Plane) -> None:
    reporter = plane.reporter()
    reporter.event(EventKind.EPOCH, "epoch 1", {"epoch": 1})
    reporter.result(epochs_completed=1)
    assert plane.store.events_after(plane.job_id)[-1].data == {"epoch": 1}
    assert plane.store.get_job(plane.job_id).result.epochs_completed == 1
    reporter.close()


@pytest.mark.reliability
def test_a_rank_other_than_0_that_fails_reports_why_and_fails_the_job_once(
    plane: Plane, tmp_path: Path
) -> None:
    """Rank 1 of 2 fails on its own (here: its dataset is missing, before any process group is joined):
    the job's events say which rank and why, the job is FAILED (not retried as a lost peer), and a second
    rank failing the same way adds nothing."""
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "no-data")
    reporter = plane.reporter()
    assert run_job(settings, reporter, Ranks(rank=1, local_rank=1, world_size=2)) == EXIT_FAILED
    reporter.close()
    job = plane.store.get_job(plane.job_id)
    assert job.state == JobState.FAILED and (job.error or "").startswith("rank 1 of 2: ")
    errors = [e for e in plane.store.events_after(plane.job_id) if e.kind == EventKind.ERROR]
    assert len(errors) == 1 and errors[0].message.startswith("rank 1 of 2: ") and errors[0].data["rank"] == 1
    second = plane.reporter()
    # the job is no longer RUNNING: the other rank's worker finds nothing to do, or reports nothing new
    run_job(settings, second, Ranks(rank=0, local_rank=0, world_size=2))
    second.close()
    assert len([e for e in plane.store.events_after(plane.job_id) if e.kind == EventKind.ERROR]) == 1
    record(
        "distributed",
        "rank 1 of a 2-rank job fails on its own (its dataset missing), rank 0 follows",
        1,
        "one ERROR event naming rank 1 and why, the job FAILED at once (not retried as a lost peer)",
    )


def test_an_archive_an_earlier_attempt_built_but_never_reported_is_reported_not_built_again(
    tmp_path: Path,
) -> None:
    settings = Settings(state_dir=tmp_path)
    spec = JobSpec.model_validate(
        {"name": "pets", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
    )
    job = Job(id="job-1", spec=spec, state=JobState.PACKAGING, created_at=0.0, updated_at=0.0)
    archive = settings.model_store / "pets-v1.mar"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"built by attempt 1")
    built = {"archive": str(archive), "sha256": "ab" * 32, "model": "pets", "version": "1"}
    settings.job_dir(job.id).mkdir(parents=True)
    (settings.job_dir(job.id) / BUILT_ARCHIVE).write_text(json.dumps(built))
    reporter = CollectingReporter()
    package(job, tmp_path / "no-such-checkpoint.pt", settings, reporter)  # would fail if it built
    assert reporter.fields == {"archive_path": str(archive), "archive_sha256": "ab" * 32}
    assert reporter.events == [(EventKind.PACKAGED, "packaged pets version 1", built)]
    assert sorted(p.name for p in settings.model_store.iterdir()) == ["pets-v1.mar"]


def test_an_error_becomes_one_line_with_its_type() -> None:
    assert one_line(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert one_line(FailedPrecondition("weights missing")) == "FailedPrecondition: weights missing"
    assert one_line(KeyError()) == "KeyError"
