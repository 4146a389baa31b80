"""Run the benchmarks (`make bench`); each prints one JSON object on its own line to stdout.

  python -m bench.run_all [--quick] [--only NAME ...] [--no-torchserve]

--quick: small sizes (seconds each; what CI-like runs use). --only: run just these (repeatable).
`lightning_compare` needs the `bench` extra (Lightning); without it, it reports itself skipped.
--no-torchserve: skip what needs TorchServe (and Java): `serving`, `deploy_stall`, and the serving half of
`job_latency` / `peak_memory`. `job_latency` and `peak_memory` read the same service run when both
are selected. A benchmark that fails prints {"benchmark": NAME, "error": ...} and the others go on;
the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

from bench import (
    cache_speed,
    control_plane,
    create_cpu,
    ddp,
    ddp_cache,
    gc_pause,
    latency,
    loop_speed,
    memory,
    reporting,
)
from bench.common import emit

NAMES = (
    "loop_speed",
    "feature_cache",
    "job_latency",
    "serving",
    "control_plane",
    "reporting",
    "peak_memory",
    "ddp",
    "ddp_cache",
    "lightning_compare",
    "gc_pause",
    "create_cpu",
    "deploy_stall",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds per benchmark")
    parser.add_argument(
        "--only", action="append", choices=NAMES, metavar="NAME", help=f"one of {', '.join(NAMES)}"
    )
    parser.add_argument("--no-torchserve", action="store_true", help="skip the parts that need TorchServe")
    args = parser.parse_args(argv)
    selected = args.only or list(NAMES)
    torchserve = not args.no_torchserve and shutil.which("java") is not None
    cuda = torch.cuda.is_available()
    shared: dict[str, Any] = {}

    def service_run() -> Any:  # one job through the service, for both latency and memory
        if "run" not in shared:
            from bench.service_run import run_job

            shared["run"] = run_job(torchserve=torchserve, epochs=1 if args.quick else 3,
                                    per_class=8 if args.quick else 40)  # fmt: skip
        return shared["run"]

    benchmarks: dict[str, Callable[[], dict[str, Any]]] = {
        "loop_speed": lambda: loop_speed.run(
            loop_speed.QUICK if args.quick else (loop_speed.GPU if cuda else loop_speed.FULL)
        ),
        "feature_cache": lambda: cache_speed.run(
            cache_speed.QUICK if args.quick else (cache_speed.GPU if cuda else cache_speed.FULL)
        ),
        "job_latency": lambda: latency.run(torchserve=torchserve, quick=args.quick, shared=service_run()),
        "serving": lambda: _serving(args.quick, torchserve),
        "control_plane": lambda: control_plane.run(control_plane.QUICK if args.quick else control_plane.FULL),
        "reporting": lambda: reporting.run(reporting.QUICK if args.quick else reporting.FULL),
        "peak_memory": lambda: memory.run(torchserve=torchserve, quick=args.quick, shared=service_run()),
        "ddp": lambda: ddp.run(ddp.QUICK if args.quick else ddp.FULL),
        "ddp_cache": lambda: ddp_cache.run(ddp_cache.QUICK if args.quick else ddp_cache.FULL),
        "lightning_compare": lambda: _lightning_compare(args.quick),
        "gc_pause": lambda: gc_pause.run(5 if args.quick else 20),
        "create_cpu": lambda: create_cpu.run(200, 3) if args.quick else create_cpu.run(2000, 5),
        "deploy_stall": lambda: _deploy_stall(args.quick, torchserve),
    }
    failed = False
    for name in NAMES:
        if name not in selected:
            continue
        try:
            emit(benchmarks[name]())
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            failed = True
            traceback.print_exc(file=sys.stderr)
            emit({"benchmark": name, "error": f"{type(exc).__name__}: {exc}"})
    return 1 if failed else 0


def _serving(quick: bool, torchserve: bool) -> dict[str, Any]:
    if not torchserve:
        return {"benchmark": "serving", "skipped": "TorchServe is off (--no-torchserve, or no java on PATH)"}
    from bench import serving

    return serving.run(quick=quick)


def _deploy_stall(quick: bool, torchserve: bool) -> dict[str, Any]:
    if not torchserve:
        return {
            "benchmark": "deploy_stall",
            "skipped": "TorchServe is off (--no-torchserve, or no java on PATH)",
        }
    from bench import deploy_stall

    return deploy_stall.run(**(deploy_stall.QUICK if quick else deploy_stall.FULL))


def _lightning_compare(quick: bool) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("lightning") is None:  # a bench-only dependency
        return {
            "benchmark": "lightning_compare",
            "skipped": "lightning is not installed (pip install -e .[bench])",
        }
    from bench import lightning_compare

    return lightning_compare.run(lightning_compare.QUICK if quick else lightning_compare.FULL)


if __name__ == "__main__":
    sys.exit(main())
