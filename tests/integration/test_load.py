"""Load: 64 concurrent clients create, watch and read jobs against one real server for a bounded time.

No call may fail, the p99 latency of each RPC is reported, and the memory of the process hosting the
server stays flat between call 2,000 and the end (at least 10,000 calls). The scheduler is stopped
after start-up and every client cancels the job it created: the load is on the API, the job store and
the watches; a training worker per job would only measure how fast two cores import torch.

TUNESERVE_LOAD_SECONDS sets the duration (60 by default).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from harness import make_image_folder, make_settings, running_service, spec
from reliability import record

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(900)]

CLIENTS = 64
DURATION_S = float(os.environ.get("TUNESERVE_LOAD_SECONDS", "60"))
MIN_CALLS = 10_000
WARM_CALLS = 2_000  # memory is compared from here: thread pools, connections and caches exist by then
MAX_RSS_GROWTH_MIB = 30.0
CALL_DEADLINE_S = 60.0
# A call over its deadline fails (an error, not a latency), so the old "p99 < deadline" held for every
# run. Measured here at load average ~9: CreateJob p99 over all calls 41.8 s with its p50 at 0.27 s - the
# first burst of 64 concurrent CreateJobs waits on start-up work - and 4 s for CancelJob. Once warm
# (calls started after WARM_CALLS, like the memory check) every RPC's p99 must leave three quarters of
# the deadline.
MAX_WARM_P99_S = CALL_DEADLINE_S / 4
TOKEN = "load-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def rss_mib() -> float:
    """Resident memory of this process (which hosts the server), from /proc."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class Tally:
    """Latencies per RPC, the total call count, and errors, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.warm_latencies: dict[str, list[float]] = defaultdict(list)  # calls started after WARM_CALLS
        self.calls = 0
        self.errors: list[str] = []

    def timed(self, name: str, call: Callable[..., Any], request: Any) -> Any:
        warm = self.calls >= WARM_CALLS
        start = time.perf_counter()
        result = call(request, metadata=AUTH, timeout=CALL_DEADLINE_S)
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latencies[name].append(elapsed)
            if warm:
                self.warm_latencies[name].append(elapsed)
            self.calls += 1
        return result


def client_loop(port: int, number: int, tally: Tally, stop: threading.Event) -> None:
    """Create a job, read it, cancel it, watch it to its end, list jobs, read it again; repeat."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = pb_grpc.FineTuningStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                request = pb.CreateJobRequest(
                    spec=spec(f"load-{number}-{n}"), idempotency_key=f"{number}-{n}"
                )
                job = tally.timed("CreateJob", client.CreateJob, request)
                by_id = pb.GetJobRequest(job_id=job.id)
                tally.timed("GetJob", client.GetJob, by_id)
                cancel = pb.CancelJobRequest(job_id=job.id)
                tally.timed("CancelJob", client.CancelJob, cancel)
                watch = pb.WatchJobRequest(job_id=job.id)
                events = tally.timed("WatchJob", lambda r, **kw: list(client.WatchJob(r, **kw)), watch)
                page = pb.ListJobsRequest(page_size=20)
                tally.timed("ListJobs", client.ListJobs, page)
                final = tally.timed("GetJob", client.GetJob, by_id)
                if final.state != pb.CANCELLED or events[-1].state != pb.CANCELLED:
                    raise AssertionError(f"job {job.id} ended {pb.JobState.Name(final.state)}")
            except Exception as exc:  # every failure is reported, none stops the others
                with tally.lock:
                    tally.errors.append(f"client {number}: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = make_settings(
        tmp_path_factory.mktemp("load"),
        auth_token=TOKEN,
        grpc_workers=CLIENTS + 8,  # every client may hold a WatchJob stream at the same moment
        max_queued_jobs=1_000_000,
    )
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        running.scheduler.stop(drain=False)  # see the module docstring
        yield running


@pytest.fixture(scope="module")
def load(service: Service) -> dict[str, Any]:
    """Run the clients for DURATION_S (longer if needed to reach MIN_CALLS), sampling memory."""
    tally, stop = Tally(), threading.Event()
    samples: list[tuple[int, float]] = []  # (calls so far, RSS MiB)
    clients = [
        threading.Thread(target=client_loop, args=(service.port, i, tally, stop), daemon=True)
        for i in range(CLIENTS)
    ]
    started = time.monotonic()
    for thread in clients:
        thread.start()
    while True:
        time.sleep(0.25)
        samples.append((tally.calls, rss_mib()))
        elapsed = time.monotonic() - started
        if (elapsed >= DURATION_S and tally.calls >= MIN_CALLS) or elapsed >= 4 * max(DURATION_S, 60):
            break
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    samples.append((tally.calls, rss_mib()))
    return {"tally": tally, "samples": samples, "seconds": time.monotonic() - started}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_sixty_four_clients_get_no_errors(load: dict[str, Any]) -> None:
    tally: Tally = load["tally"]
    assert tally.errors == []
    assert tally.calls >= MIN_CALLS
    record(
        "load",
        f"{CLIENTS} clients creating, cancelling, watching, listing jobs for {load['seconds']:.0f} s",
        tally.calls,
        f"no errors; {tally.calls / load['seconds']:.0f} calls/s",
    )


def test_p99_latency_of_each_rpc_once_warm_is_under_a_quarter_of_its_deadline(load: dict[str, Any]) -> None:
    tally: Tally = load["tally"]
    rpcs = {"CreateJob", "GetJob", "CancelJob", "WatchJob", "ListJobs"}
    assert set(tally.latencies) == set(tally.warm_latencies) == rpcs
    for name, values in sorted(tally.latencies.items()):
        warm = tally.warm_latencies[name]
        p50, p99, warm_p99 = percentile(values, 0.5), percentile(values, 0.99), percentile(warm, 0.99)
        assert warm_p99 < MAX_WARM_P99_S, f"{name}: p99 {warm_p99:.1f} s once warm (all calls: {p99:.1f} s)"
        record(
            "load",
            f"{name} latency under {CLIENTS} clients",
            len(values),
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; after call {WARM_CALLS:,}: "
            f"p99 {warm_p99 * 1000:.1f} ms",
        )


def test_memory_of_the_service_is_flat_over_ten_thousand_calls(load: dict[str, Any]) -> None:
    samples: list[tuple[int, float]] = load["samples"]
    warm = next(rss for calls, rss in samples if calls >= WARM_CALLS)
    end_calls, end = samples[-1]
    assert end_calls >= MIN_CALLS
    assert end - warm < MAX_RSS_GROWTH_MIB, (
        f"RSS grew {end - warm:.1f} MiB from call {WARM_CALLS} to {end_calls}"
    )
    record(
        "load",
        f"service memory (RSS) from call {WARM_CALLS:,} to call {end_calls:,}",
        end_calls,
        f"{warm:.0f} -> {end:.0f} MiB ({end - warm:+.1f} MiB; bound {MAX_RSS_GROWTH_MIB:.0f} MiB)",
    )
