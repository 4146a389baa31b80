"""A worker's work: train one job, package it, and report everything through its JobReporter.

The worker process (service.worker_app) reads its settings from the TUNESERVE_* environment and reports
through the control plane's internal API; it never opens the job store. The scheduler moves the job to
RUNNING before it launches the worker and decides what follows its exit (service.jobs.launcher):
exit 0 packaged, 75 stopped at a safe point, 1 failed (already reported FAILED), else a crash.

Under DDP every rank runs this; rank 0 alone moves the job and packages it, the others train and exit.
A rank that fails reports its own failure (the job's events name the rank and why); the others learn of
it as a failed collective (PeerLost) and exit without reporting again.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path
from typing import Protocol

from service.errors import JobCancelled, one_line
from service.jobs.launcher import EXIT_FAILED, EXIT_OK, EXIT_PEER_LOST, EXIT_STOPPED
from service.records import EventKind, Job, JobState
from service.settings import Settings
from service.training.distributed import PeerLost, Ranks
from service.training.reporting import Reporter

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_STOPPED", "JobReporter", "one_line", "run_job"]

log = logging.getLogger("service.jobs.worker")

BUILT_ARCHIVE = "archive.json"  # in the job's folder: the archive this job built


class JobReporter(Reporter, Protocol):
    """The engine's Reporter, plus what the worker itself needs from the control plane."""

    def assignment(self) -> Job:
        """The job as the control plane has it now (spec, state, attempts, result so far)."""

    def move(self, to_state: JobState, reason: str) -> None:
        """Move the job to PACKAGING or FAILED, after every event reported before."""


def run_job(settings: Settings, reporter: JobReporter, ranks: Ranks | None = None) -> int:
    """Train, then package, the reporter's job; returns the process exit code (service.jobs.launcher).
    `ranks`: this process's place in a DDP job (default: the only process)."""
    ranks = ranks or Ranks()
    job = reporter.assignment()
    if job.state != JobState.RUNNING:
        log.warning("job %s is %s, not RUNNING; nothing to do", job.id, job.state)
        return EXIT_STOPPED
    try:
        return _train_and_package(job, settings, reporter, ranks)
    except JobCancelled:
        return EXIT_STOPPED
    except PeerLost as exc:
        log.error("job %s: %s", job.id, one_line(exc))
        if reporter.stop_requested():
            return EXIT_STOPPED
        if _failed_by_a_peer(reporter):
            return EXIT_FAILED  # that rank reported why; nothing to retry
        # a rank died: not this job's failure, so nothing is reported and the exit counts as a crash;
        # the scheduler's retry resumes every rank from the last checkpoint
        return EXIT_PEER_LOST
    except Exception as exc:
        reason = one_line(exc)
        if reporter.stop_requested():
            # the SIGTERM to our process group (drain, cancel, a restarted service) also ends children
            # such as torch-model-archiver: that is the stop, not a failure of the job
            log.warning("job %s stopped on request during %s", job.id, reason)
            return EXIT_STOPPED
        log.exception("job %s failed (%s): %s", job.id, ranks.describe(), reason)
        if ranks.distributed:
            _report_rank_failure(reporter, ranks, reason)
            return EXIT_FAILED
        reporter.event(EventKind.ERROR, reason, {"traceback": traceback.format_exc()})
        reporter.move(JobState.FAILED, reason)
        return EXIT_FAILED


def _report_rank_failure(reporter: JobReporter, ranks: Ranks, reason: str) -> None:
    """A rank failed on its own (its shard's data, its device): it reports the failure itself, whichever
    rank it is, or only worker.log would say why. Its exit then ends the group at once: torchrun stops the
    other ranks, whose collectives with this rank fail (PeerLost) and find the job FAILED."""
    try:
        if reporter.assignment().state.is_final:
            return  # another rank failed first (the same way, most often) and said so
        message = f"{ranks.describe()}: {reason}"
        reporter.event(EventKind.ERROR, message, {"traceback": traceback.format_exc(), "rank": ranks.rank})
        reporter.move(JobState.FAILED, message)
    except Exception:  # the job moved meanwhile, or the service is gone: the exit still fails the group
        log.exception("could not report %s's failure", ranks.describe())


def _failed_by_a_peer(reporter: JobReporter) -> bool:
    try:
        return reporter.assignment().state == JobState.FAILED
    except Exception:
        log.exception("could not read the job's state after losing a peer")
        return False


def _train_and_package(job: Job, settings: Settings, reporter: JobReporter, ranks: Ranks) -> int:
    from service.training.runner import train

    job_dir = settings.job_dir(job.id)
    job_dir.mkdir(parents=True, exist_ok=True)
    log.info("job %s: training (attempt %d)", job.id, job.attempts)
    outcome = train(job.spec, job_dir, settings, reporter, ranks)
    if not ranks.is_main:
        return EXIT_OK if outcome.status == "completed" else EXIT_STOPPED
    if outcome.status != "completed":
        why = reporter.stop_requested() or outcome.stop_reason or outcome.status
        message = f"training stopped ({why}); the last checkpoint is kept"
        log.info("job %s: %s", job.id, message)  # also here: with the service gone, no event arrives
        reporter.event(EventKind.INFO, message)
        return EXIT_STOPPED
    reporter.move(JobState.PACKAGING, outcome.stop_reason or "training finished")
    checkpoint = outcome.best_checkpoint or job_dir / "checkpoints" / "best.pt"
    if not Path(checkpoint).is_file():
        raise RuntimeError(f"training finished without a best checkpoint (looked for {checkpoint})")
    package(reporter.assignment(), Path(checkpoint), settings, reporter)
    return EXIT_OK


def package(job: Job, checkpoint: Path, settings: Settings, reporter: Reporter) -> None:
    """Build the job's TorchServe archive under the next free version of its model name."""
    if job.result.archive_path and Path(job.result.archive_path).is_file():
        log.info("job %s already packaged as %s", job.id, job.result.archive_path)
        return
    built = _built_before(settings.job_dir(job.id))
    if built is not None:  # an earlier attempt built it, but its report never arrived (the service died)
        log.info("job %s: reporting archive %s built by an earlier attempt", job.id, built["archive"])
    else:
        built = _build(job, checkpoint, settings)
    reporter.result(archive_path=built["archive"], archive_sha256=built["sha256"])
    reporter.event(EventKind.PACKAGED, f"packaged {built['model']} version {built['version']}", built)


def _build(job: Job, checkpoint: Path, settings: Settings) -> dict[str, str]:
    from service.packaging.choose_backend import packager

    # the backend's one version rule: the next free version of the model in the model store
    archive = packager(settings).package(checkpoint, job.spec.model_name)
    built = {
        "archive": str(archive.path),
        "sha256": str(archive.sha256),
        "model": archive.name,
        "version": archive.version,
    }
    # kept in the job's folder before it is reported: a report lost with a dying service is made again by
    # the next attempt, rather than a second archive built
    record = settings.job_dir(job.id) / BUILT_ARCHIVE
    temporary = record.with_suffix(".tmp")
    temporary.write_text(json.dumps(built))
    os.replace(temporary, record)
    return built


def _built_before(job_dir: Path) -> dict[str, str] | None:
    try:
        built: dict[str, str] = json.loads((job_dir / BUILT_ARCHIVE).read_text())
    except (OSError, ValueError):
        return None
    return built if Path(built.get("archive", "")).is_file() else None
