"""The worker process: trains one job, packages it, and records everything in the job store.

    python -m service.jobs.worker --job-id job-1a2b3c4d5e6f

Settings come from the TUNESERVE_* environment (the scheduler passes its own). The scheduler moves the
job to RUNNING before it starts this process and decides what follows its exit:
  exit 0            trained and packaged; the job is PACKAGING and ready to be served
  exit 75           stopped on request (SIGTERM) at a safe point, checkpoint saved; the scheduler makes it
                    CANCELLED or QUEUED (draining), whichever it asked for
  exit 1            failed; the worker has already recorded FAILED with the reason
  anything else     a crash (signal, OOM kill): the scheduler retries from the last checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from service.errors import AlreadyExists, JobCancelled
from service.jobs.store import JobStore
from service.records import EventKind, Job, JobState
from service.settings import Settings

log = logging.getLogger("service.jobs.worker")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable
_VERSION_ATTEMPTS = 5


class StoreReporter:
    """The engine's Reporter, writing into the job store; SIGTERM turns into a stop request."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self._signalled = threading.Event()
        self._reason: str | None = None
        self._parent = os.getppid()

    def event(self, kind: EventKind, message: str, data: dict[str, Any] | None = None) -> None:
        self.store.append_event(self.job_id, kind, message, data)

    def result(self, **fields: Any) -> None:
        self.store.update_result(self.job_id, **fields)

    def stop_requested(self) -> str | None:
        if self._reason is None and self._signalled.is_set():
            # the scheduler sends SIGTERM for both; the store says whether a user asked to cancel
            self._reason = "cancelled" if self.store.get_job(self.job_id).cancel_requested else "draining"
        if self._reason is None and os.getppid() != self._parent:
            self._reason = "draining"  # the service died: stop at a checkpoint; the next one requeues us
        return self._reason

    def signal_stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        """Signal handler: only sets a flag, the engine stops at its next safe point."""
        self._signalled.set()


def run_job(job_id: str, settings: Settings, store: JobStore) -> int:
    """Train, then package, one job; returns the process exit code (see the module docstring)."""
    reporter = StoreReporter(store, job_id)
    signal.signal(signal.SIGTERM, reporter.signal_stop)
    signal.signal(signal.SIGINT, reporter.signal_stop)
    job = store.get_job(job_id)
    if job.state != JobState.RUNNING:
        log.warning("job %s is %s, not RUNNING; nothing to do", job_id, job.state)
        return EXIT_STOPPED
    try:
        return _train_and_package(job, settings, store, reporter)
    except JobCancelled:
        return EXIT_STOPPED
    except Exception as exc:
        reason = one_line(exc)
        if reporter.stop_requested():
            # the SIGTERM to our process group (drain, cancel, a restarted service) also ends children
            # such as torch-model-archiver: that is the stop, not a failure of the job
            log.warning("job %s stopped on request during %s", job_id, reason)
            return EXIT_STOPPED
        log.exception("job %s failed: %s", job_id, reason)
        store.append_event(job_id, EventKind.ERROR, reason, {"traceback": traceback.format_exc()})
        store.transition(job_id, JobState.FAILED, reason)
        return EXIT_FAILED


def _train_and_package(job: Job, settings: Settings, store: JobStore, reporter: StoreReporter) -> int:
    from service.training.runner import train

    job_dir = settings.job_dir(job.id)
    job_dir.mkdir(parents=True, exist_ok=True)
    log.info("job %s: training (attempt %d)", job.id, job.attempts)
    outcome = train(job.spec, job_dir, settings, reporter)
    if outcome.status != "completed":
        why = reporter.stop_requested() or outcome.stop_reason or outcome.status
        reporter.event(EventKind.INFO, f"training stopped ({why}); the last checkpoint is kept")
        return EXIT_STOPPED
    store.transition(job.id, JobState.PACKAGING, outcome.stop_reason or "training finished")
    checkpoint = outcome.best_checkpoint or job_dir / "checkpoints" / "best.pt"
    if not Path(checkpoint).is_file():
        raise RuntimeError(f"training finished without a best checkpoint (looked for {checkpoint})")
    package(store.get_job(job.id), Path(checkpoint), settings, store)
    return EXIT_OK


def package(job: Job, checkpoint: Path, settings: Settings, store: JobStore) -> None:
    """Build the job's TorchServe archive under the next free version of its model name."""
    if job.result.archive_path and Path(job.result.archive_path).is_file():
        log.info("job %s already packaged as %s", job.id, job.result.archive_path)
        return
    try:
        from service.packaging.archiver import build_archive
    except ImportError as exc:  # a deployment without the packaging side
        store.append_event(job.id, EventKind.WARNING, f"no archive built: packaging is unavailable ({exc})")
        return
    model_name = job.spec.model_name
    accepted = inspect.signature(build_archive).parameters
    extra = {"max_image_pixels": settings.max_image_pixels} if "max_image_pixels" in accepted else {}
    for _ in range(_VERSION_ATTEMPTS):
        version = next_version(settings.model_store, model_name)
        try:
            archive = build_archive(checkpoint, settings.model_store, model_name, version, **extra)
            break
        except AlreadyExists:  # another job took this version while we built: take the next one
            continue
    else:
        raise RuntimeError(
            f"no free archive version for model {model_name!r} after {_VERSION_ATTEMPTS} tries"
        )
    path, sha256 = Path(archive.path), str(archive.sha256)
    store.update_result(job.id, archive_path=str(path), archive_sha256=sha256)
    data = {"archive": str(path), "sha256": sha256, "model": model_name, "version": version}
    store.append_event(job.id, EventKind.PACKAGED, f"packaged {model_name} version {version}", data)


def next_version(model_store: Path, model_name: str) -> str:
    """One more than the highest `<model_name>-v<N>.mar` in the model store ("1" for the first)."""
    pattern = re.compile(rf"^{re.escape(model_name)}-v(\d+)\.mar$")
    found = [int(m.group(1)) for p in model_store.glob("*.mar") if (m := pattern.match(p.name))]
    return str(max(found, default=0) + 1)


def one_line(exc: BaseException) -> str:
    """`Type: message`, first line only: a job's error, short enough for a list."""
    text = str(exc).strip().splitlines()
    message = getattr(exc, "message", None) or (text[0] if text else "")
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TUNESERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d] %(message)s",
    )
    # its own process group, so a cancel stops its data-loader children too (already so when the
    # scheduler started it with start_new_session: setsid then fails, harmlessly)
    with contextlib.suppress(OSError):
        os.setsid()
    settings = Settings()  # type: ignore[call-arg]  # every field has a default; values come from env
    store = JobStore(settings.jobs_db)
    try:
        return run_job(args.job_id, settings, store)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
