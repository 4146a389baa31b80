"""Benchmark 6: peak memory (VmHWM) of the service process, a training worker and TorchServe's frontend
(JVM) and model worker, over one job to served (bench.service_run). The baseline in the same run: a
bare Python process that imports torch and torchvision; ratios are against it.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import emit, ratio
from bench.service_run import ServiceRun, bare_python_torch_mib, run_job

NAME = "peak_memory"


def run(*, torchserve: bool, quick: bool, shared: ServiceRun | None = None) -> dict[str, Any]:
    result = shared or run_job(torchserve=torchserve, epochs=1 if quick else 3, per_class=8 if quick else 40)
    baseline = bare_python_torch_mib()
    peaks = result.peak_rss_mib
    return {
        "benchmark": NAME,
        "torchserve": torchserve,
        "peak_rss_mib": peaks,
        "processes_seen": result.processes,
        "bare_python_torch_mib": baseline,
        "ratio_to_bare_python_torch": {role: round(ratio(mib, baseline), 2) for role, mib in peaks.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torchserve", action="store_true")
    args = parser.parse_args(argv)
    emit(run(torchserve=not args.no_torchserve, quick=args.quick))


if __name__ == "__main__":
    main()
