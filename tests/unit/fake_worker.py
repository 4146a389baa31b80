"""A stand-in for service.jobs.worker that the scheduler tests start: it acts out its job's name.

ok*        -> PACKAGING, exit 0          fail*     -> records FAILED, exit 1
crash*     -> killed by SIGKILL          exit3*    -> exit code 3 without recording anything
slow*      -> waits; SIGTERM -> exit 75  stubborn* -> ignores SIGTERM
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from service.jobs.store import JobStore
from service.records import EventKind, JobState
from service.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job-id", required=True)
    job_id = parser.parse_args().job_id
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    store = JobStore(Settings().jobs_db)  # type: ignore[call-arg]
    name = store.get_job(job_id).spec.name
    if name.startswith("stubborn"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # what the scheduler gave it, read back by the tests
    seen = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    store.append_event(job_id, EventKind.INFO, "fake worker started", seen)
    if name.startswith("ok"):
        store.transition(job_id, JobState.PACKAGING, "trained")
        store.update_result(job_id, archive_path="/nowhere/x.mar", archive_sha256="0" * 64)
        return 0
    if name.startswith("fail"):
        store.transition(job_id, JobState.FAILED, "ValueError: boom")
        return 1
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("exit3"):
        return 3
    while not stop:
        time.sleep(0.05)
    store.append_event(job_id, EventKind.INFO, "fake worker stopping")
    return 75


if __name__ == "__main__":
    sys.exit(main())
