"""A job's first reports with a channel connected ahead (a spare's ReadyChannel) vs a fresh channel.

What a warm-started worker waits for before its first training step on the reporting side: the reporter
made, its assignment read (GetAssignment) and its first event delivered. Each try is a fresh worker-like
process (gRPC's core starts with the process's first channel, as in a worker), against one real reporting
server on loopback in this process; the two ways interleaved. The connection made ahead is not timed (the
spare makes it while it waits for its job). Baseline: the fresh channel.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, median, ratio
from service.api.report_client import GrpcReporter, ReadyChannel
from service.api.reporting_server import start_reporting_server
from service.jobs.intake import Intake
from service.jobs.store import JobStore
from service.records import EventKind, JobState
from service.settings import Settings
from service.spec import JobSpec

NAME = "report_connect"


def first_reports(address: str, token: str, job_id: str, ready: ReadyChannel | None) -> float:
    started = time.perf_counter()
    channel = None if ready is None else ready.take_for(address, None)
    reporter = GrpcReporter(address, token, job_id, channel=channel).start()
    reporter.assignment()
    reporter.event(EventKind.INFO, "first")
    reporter.flush()
    took = time.perf_counter() - started
    reporter.close()
    return took


def run(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=Path(tmp))  # type: ignore[call-arg]
        store = JobStore(settings.jobs_db)
        intake = Intake(store)
        server = start_reporting_server(settings, intake)
        spec = JobSpec.model_validate(
            {"name": "b", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
        )
        fresh: list[float] = []
        ahead: list[float] = []
        try:
            for _ in range(rounds):
                for times, early in ((fresh, False), (ahead, True)):
                    job_id = store.create_job(spec).id
                    store.transition(job_id, JobState.RUNNING)
                    argv = [
                        "--one",
                        server.address,
                        intake.issue(job_id),
                        job_id,
                        *(["--ahead"] if early else []),
                    ]
                    out = subprocess.run(
                        [sys.executable, "-m", "bench.report_connect", *argv],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    times.append(float(out.stdout.split()[-1]))
        finally:
            server.stop(0)
            store.close()
    return {
        "benchmark": NAME,
        "rounds": rounds,
        "fresh_channel_s": round(median(fresh), 4),
        "connected_ahead_s": round(median(ahead), 4),
        "connected_ahead_vs_fresh": round(ratio(median(ahead), median(fresh)), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--one", nargs=3, metavar=("ADDRESS", "TOKEN", "JOB_ID"), help="one try (a child)")
    parser.add_argument("--ahead", action="store_true", help="one try: connect ahead first (untimed)")
    args = parser.parse_args(argv)
    if args.one:
        address, token, job_id = args.one
        ready = ReadyChannel(address, None) if args.ahead else None
        print(first_reports(address, token, job_id, ready))
        return
    emit(run(args.rounds))


if __name__ == "__main__":
    main()
