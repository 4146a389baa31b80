"""Benchmark: the job store's operations on each backend, in-process, against raw sqlite3 in the same run.

Raw sqlite3 (the default store) is the baseline; SQLite through SQLAlchemy Core (a sqlite:/// URL) shows
what SQLAlchemy costs; PostgreSQL (--postgres-url, e.g. a throw-away cluster) what a shared database
costs. Each operation is timed over `ops` calls on a store that already holds `jobs` jobs; the JSON has
microseconds per call for each backend and its ratio to raw sqlite3 (> 1: slower).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import emit, median, ratio

NAME = "store_backends"


@dataclass(frozen=True)
class Size:
    jobs: int
    ops: int


QUICK = Size(jobs=60, ops=200)
FULL = Size(jobs=200, ops=2000)


ROUNDS = 10  # backends take turns, round by round, so a busy machine slows each of them alike


def run(size: Size, postgres_url: str | None = None) -> dict[str, Any]:
    from service.jobs.store import JobStore

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        targets: dict[str, Path | str] = {
            "sqlite": Path(tmp) / "raw" / "jobs.sqlite3",
            "sqlalchemy_sqlite": f"sqlite:///{Path(tmp) / 'sa' / 'jobs.sqlite3'}",
        }
        if postgres_url:
            targets["postgresql"] = postgres_url
        stores = {name: JobStore(target) for name, target in targets.items()}
        try:
            timings = measure(stores, size)
        finally:
            for store in stores.values():
                store.close()
    result: dict[str, Any] = {"benchmark": NAME, "jobs": size.jobs, "ops": size.ops}
    for backend, ops in timings.items():
        for op, us in ops.items():
            result[f"{op}_us_{backend}"] = round(us, 1)
            if backend != "sqlite":
                result[f"{op}_{backend}_vs_sqlite"] = round(ratio(us, timings["sqlite"][op]), 2)
    if not postgres_url:
        result["postgresql"] = "not measured: pass --postgres-url"
    return result


def measure(stores: dict[str, Any], size: Size) -> dict[str, dict[str, float]]:
    """Median microseconds per call of each store operation, for each store."""
    from service.records import EventKind, JobState
    from service.spec import JobSpec

    def spec(i: int) -> JobSpec:
        model = {"architecture": "resnet18"}
        return JobSpec.model_validate({"name": f"j{i}", "model": model, "data": {"path": "ds"}})

    operations: dict[str, dict[str, Callable[[], object]]] = {}
    for name, store in stores.items():
        ids = [store.create_job(spec(i)).id for i in range(size.jobs)]
        job = ids[-1]
        store.transition(job, JobState.RUNNING)
        counter = iter(range(size.jobs, 10**9))
        operations[name] = {
            "create_job": lambda s=store, c=counter: s.create_job(spec(next(c))),
            "get_job": lambda s=store, j=job: s.get_job(j),
            "list_jobs_50": lambda s=store: s.list_jobs(page_size=50),
            "append_event": lambda s=store, j=job: s.append_event(j, EventKind.PROGRESS, "step", {"step": 1}),
            "events_after": lambda s=store, j=job: s.events_after(j, 0, 50),
        }
    per_round = max(1, size.ops // ROUNDS)
    samples: dict[str, dict[str, list[float]]] = {n: {op: [] for op in ops} for n, ops in operations.items()}
    for op in operations["sqlite"]:
        for name in operations:
            operations[name][op]()  # warm: compiles the statement, opens this thread's connection
        for _ in range(ROUNDS):
            for name, ops in operations.items():
                samples[name][op].append(per_call_us(ops[op], per_round))
    return {name: {op: median(values) for op, values in ops.items()} for name, ops in samples.items()}


def per_call_us(work: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        work()
    return 1e6 * (time.perf_counter() - started) / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("TUNESERVE_BENCH_POSTGRES_URL"),
        help="an empty PostgreSQL database to measure too (default: $TUNESERVE_BENCH_POSTGRES_URL)",
    )
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else FULL, args.postgres_url))


if __name__ == "__main__":
    main()
