"""A stand-in for the worker that the scheduler tests launch: it acts out its job's name, reporting
through the real internal reporting API (service.api.report_client), as the real worker does.

ok*        -> PACKAGING, exit 0          fail*     -> reports FAILED, exit 1
crash*     -> killed by SIGKILL          exit3*    -> exit code 3 without reporting anything
slow*      -> waits; stop -> exit 75     stubborn* -> ignores SIGTERM
frozen*    -> stops itself (SIGSTOP): no more heartbeats, as a hung worker
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from service.api.report_client import GrpcReporter
from service.jobs.launcher import REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV
from service.records import EventKind, JobState
from service.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job-id", required=True)
    job_id = parser.parse_args().job_id
    settings = Settings()  # type: ignore[call-arg]
    address, token = os.environ[REPORT_ADDRESS_ENV], os.environ[REPORT_TOKEN_ENV]
    reporter = GrpcReporter(
        address,
        token,
        job_id,
        heartbeat_s=settings.report_heartbeat_s,
        lost_after_s=settings.report_lost_s,
        tls_ca=settings.report_tls_ca,
    )
    signal.signal(signal.SIGTERM, reporter.signal_stop)
    name = reporter.assignment().spec.name
    if name.startswith("stubborn"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reporter.start()
    # what the launcher gave it, read back by the tests
    seen = {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    reporter.event(EventKind.INFO, "fake worker started", seen)
    reporter.flush()
    try:
        if name.startswith("ok"):
            reporter.move(JobState.PACKAGING, "trained")
            reporter.result(archive_path="/nowhere/x.mar", archive_sha256="0" * 64)
            return 0
        if name.startswith("fail"):
            reporter.move(JobState.FAILED, "ValueError: boom")
            return 1
        if name.startswith("crash"):
            os.kill(os.getpid(), signal.SIGKILL)
        if name.startswith("exit3"):
            return 3
        if name.startswith("frozen"):
            os.kill(os.getpid(), signal.SIGSTOP)
        while not reporter.stop_requested():
            time.sleep(0.05)
        reporter.event(EventKind.INFO, "fake worker stopping", {"reason": reporter.stop_requested()})
        return 75
    finally:
        reporter.close()


if __name__ == "__main__":
    sys.exit(main())
