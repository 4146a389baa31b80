"""Benchmark 11: how long one full garbage collection holds the GIL in a process that has imported what
the service imports, before and after service.heap.freeze_imports().

A fresh interpreter imports the admission's modules (torch, torchvision, timm) as the service does at
start, then times `gc.collect()` (a full, generation-2 collection: every thread waits for it) a number of
times, freezes, and times it again, in the same process. The baseline is the same process unfrozen. Under
a burst of CreateJobs such a collection came every few seconds and set every RPC's p99
(bench/control_plane.py); a TorchServe worker forked from the zygote and a training worker pay the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from bench.common import emit, ratio

NAME = "gc_pause"

MEASURE = """
import gc, json, time
from service.heap import freeze_imports

def full_collections(rounds):
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - began) * 1000)
    return times

import service.training.layers, service.training.registry, service.training.weights  # as the preload
tracked = len(gc.get_objects())
before = full_collections({rounds})
frozen = freeze_imports()
after = full_collections({rounds})
print(json.dumps({{"tracked": tracked, "frozen": frozen, "before_ms": before, "after_ms": after}}))
"""


def run(rounds: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE.format(rounds=rounds)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed: {done.stderr[-2000:]}")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = statistics.median(seen["before_ms"]), statistics.median(seen["after_ms"])
    return {
        "benchmark": NAME,
        "rounds": rounds,
        "objects_tracked_after_imports": seen["tracked"],
        "objects_frozen": seen["frozen"],
        "full_collection_ms_unfrozen": round(before, 2),
        "full_collection_ms_frozen": round(after, 4),
        "frozen_vs_unfrozen": round(ratio(after, before), 6),
        "max_ms": {"unfrozen": round(max(seen["before_ms"]), 2), "frozen": round(max(seen["after_ms"]), 4)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    emit(run(5 if args.quick else 20))


if __name__ == "__main__":
    main()
