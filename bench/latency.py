"""Benchmark 3: job latency: submission to the first training step; end of training to the served
model's first answer. One small job through a real `tuneserve serve` process (bench.service_run).

Times come from the job's own events (the service's clock, the same machine's) and this client's
clock. The baseline in the same run: the training itself (training_s), so the figures read as the
overhead around the work. With --no-torchserve only the first half is measured.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import emit, ratio
from bench.service_run import ServiceRun, run_job

NAME = "job_latency"


def run(*, torchserve: bool, quick: bool, shared: ServiceRun | None = None) -> dict[str, Any]:
    result = shared or run_job(torchserve=torchserve, epochs=1 if quick else 3, per_class=8 if quick else 40)
    latency = result.latency
    out: dict[str, Any] = {"benchmark": NAME, "torchserve": torchserve, **latency}
    out["first_step_overhead_vs_training"] = round(
        ratio(latency["submit_to_first_step_s"], latency["training_s"]), 3
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torchserve", action="store_true", help="measure submission to first step only")
    args = parser.parse_args(argv)
    emit(run(torchserve=not args.no_torchserve, quick=args.quick))


if __name__ == "__main__":
    main()
