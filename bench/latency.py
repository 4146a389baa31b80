"""Benchmark 3: job latency: submission to the first training step; end of training to the served
model's first answer. One small job through a real `tuneserve serve` process (bench.service_run).

Times come from the job's own events (the service's clock, the same machine's), the worker's own timings
line and this client's clock, with their parts (bench.service_run.parts): queue, spawn, imports, build,
first batch; package, register, gate, promote, first answer. The baselines in the same run: the
training itself (training_s), so the figures read as the overhead around the work, and with --compare
the same job with warm workers off (TUNESERVE_WARM_WORKERS=0: a worker spawned per job, as before the
spare worker), as `cold` with the ratio warm / cold; with --compare-torchserve the same job with
TorchServe's workers started cold (TUNESERVE_TORCHSERVE_WARM_WORKERS=false: no zygote), as
`torchserve_cold` with the ratio. `register_parts_s` splits the register part by TorchServe's logs.
With --no-torchserve only the first half is measured.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import emit, ratio
from bench.service_run import ServiceRun, run_job

NAME = "job_latency"


def run(
    *,
    torchserve: bool,
    quick: bool,
    shared: ServiceRun | None = None,
    compare: bool = False,
    compare_torchserve: bool = False,
) -> dict[str, Any]:
    size = {"epochs": 1 if quick else 3, "per_class": 8 if quick else 40}
    result = shared or run_job(torchserve=torchserve, **size)
    out = summary(result.latency, torchserve)
    if compare:
        cold = run_job(torchserve=torchserve, extra_env={"TUNESERVE_WARM_WORKERS": "0"}, **size).latency
        out["cold"] = summary(cold, torchserve)
        out["first_step_warm_vs_cold"] = round(
            ratio(out["submit_to_first_step_s"], cold["submit_to_first_step_s"]), 3
        )
        if torchserve:
            out["first_answer_warm_vs_cold"] = round(
                ratio(out["training_end_to_first_answer_s"], cold["training_end_to_first_answer_s"]), 3
            )
    if compare_torchserve and torchserve:
        # the same job with TorchServe's workers started cold (a fresh Python each), in the same run
        off = {"TUNESERVE_TORCHSERVE_WARM_WORKERS": "false"}
        cold_ts = run_job(torchserve=True, extra_env=off, **size).latency
        out["torchserve_cold"] = summary(cold_ts, torchserve)
        out["first_answer_warm_vs_cold_torchserve"] = round(
            ratio(out["training_end_to_first_answer_s"], cold_ts["training_end_to_first_answer_s"]), 3
        )
    return out


def summary(latency: dict[str, Any], torchserve: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": NAME, "torchserve": torchserve, **latency}
    out["first_step_overhead_vs_training"] = round(
        ratio(latency["submit_to_first_step_s"], latency["training_s"]), 3
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torchserve", action="store_true", help="measure submission to first step only")
    parser.add_argument(
        "--compare", action="store_true", help="also run the job with warm workers off (the baseline)"
    )
    parser.add_argument(
        "--compare-torchserve",
        action="store_true",
        help="also run the job with TorchServe's warm workers off (TUNESERVE_TORCHSERVE_WARM_WORKERS=false)",
    )
    args = parser.parse_args(argv)
    emit(
        run(
            torchserve=not args.no_torchserve,
            quick=args.quick,
            compare=args.compare,
            compare_torchserve=args.compare_torchserve,
        )
    )


if __name__ == "__main__":
    main()
