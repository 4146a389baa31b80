"""The worker process, assembled: settings from the environment, a gRPC reporter, one job's work.

    python -m service.worker_app --job-id job-1a2b3c4d5e6f

Under torchrun (a DDP job) every rank runs it; it reads RANK, LOCAL_RANK and WORLD_SIZE
(service.training.distributed) and dies with torchrun. A launcher (service.jobs.launcher) starts it
with every setting as TUNESERVE_* and, for this launch only,
the reporting API's address and a job-scoped token. It reads its job and reports through that API alone:
no path to the job store is given to it and it opens none. Exit codes: service.jobs.launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys

from service.api.report_client import GrpcReporter
from service.jobs.launcher import REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV
from service.jobs.worker import run_job
from service.settings import Settings
from service.training.distributed import Ranks

log = logging.getLogger("service.worker_app")

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TUNESERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d] %(message)s",
    )
    # its own process group, so a stop reaches its data-loader children too (already so when the
    # launcher started it with start_new_session: setsid then fails, harmlessly)
    with contextlib.suppress(OSError):
        os.setsid()
    ranks = Ranks.from_env()
    if ranks.distributed:
        _die_with_parent()
    # taken out of the environment: the children (data loaders, torch-model-archiver) need neither
    address, token = os.environ.pop(REPORT_ADDRESS_ENV, ""), os.environ.pop(REPORT_TOKEN_ENV, "")
    if not address or not token:
        log.error("%s and %s must be set (a launcher sets them)", REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV)
        return EXIT_USAGE
    settings = Settings()  # type: ignore[call-arg]  # every field has a default; values come from env
    reporter = GrpcReporter(
        address,
        token,
        args.job_id,
        heartbeat_s=settings.report_heartbeat_s,
        lost_after_s=settings.report_lost_s,
    ).start()
    signal.signal(signal.SIGTERM, reporter.signal_stop)
    signal.signal(signal.SIGINT, reporter.signal_stop)
    try:
        return run_job(settings, reporter, ranks)
    finally:
        reporter.close()


def _die_with_parent() -> None:
    """A rank ends when torchrun does, even by SIGKILL (its own session is out of the group's reach)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
