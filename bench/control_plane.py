"""Benchmark 5: GetJob and ListJobs calls per second and latency with 32 concurrent clients.

A real service (service.app.start_service: SQLite store, scheduler, gRPC server with its
interceptors) on loopback in this process, TorchServe off. Jobs are created and cancelled through
the API first, so the store holds real rows and no training competes for the CPU. Each client is a
thread with its own channel (its own HTTP/2 connection). Baselines in the same run: one client alone
(how far 32 clients scale) and the store read the RPC wraps, called in-process (the API's overhead).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import emit, make_image_folder, percentile, ratio

NAME = "control_plane"


@dataclass(frozen=True)
class Size:
    jobs: int
    seconds: float  # per measurement
    clients: int = 32


QUICK = Size(jobs=12, seconds=1.5)
FULL = Size(jobs=60, seconds=5.0)


def run(size: Size) -> dict[str, Any]:
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
    from service.app import start_service
    from service.records import JobState
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        root = Path(tmp)
        make_image_folder(root / "data" / "ds", classes=2, per_class=4, size=32)
        settings = Settings(
            state_dir=root / "state", data_root=root / "data", torch_home=root / "torch", host="127.0.0.1",
            port=0, torchserve_enabled=False, max_concurrent_jobs=1, max_queued_jobs=max(100, size.jobs),
        )  # fmt: skip
        service = start_service(settings)
        try:
            target = f"127.0.0.1:{service.port}"
            with grpc.insecure_channel(target) as channel:
                client = pb_grpc.FineTuningStub(channel)
                ids = [client.CreateJob(pb.CreateJobRequest(spec=_spec(pb, i))).id for i in range(size.jobs)]
                for job_id in ids:
                    client.CancelJob(pb.CancelJobRequest(job_id=job_id))
                _wait_all_final(client, pb, ids)

            def get(stub: Any, i: int) -> Any:
                return stub.GetJob(pb.GetJobRequest(job_id=ids[i % len(ids)]))

            def list_jobs(stub: Any, i: int) -> Any:
                return stub.ListJobs(pb.ListJobsRequest(page_size=50))

            store = service.store
            results: dict[str, Any] = {}
            for rpc, call, local in (
                ("GetJob", get, lambda i: store.get_job(ids[i % len(ids)])),
                ("ListJobs", list_jobs, lambda i: store.list_jobs((), 50, "")),
            ):
                alone = _load(target, pb_grpc, call, 1, size.seconds)
                crowd = _load(target, pb_grpc, call, size.clients, size.seconds)
                in_process = _local_rate(local, size.seconds / 2)
                results[rpc] = {
                    f"calls_per_s_{size.clients}_clients": round(crowd["rate"], 1),
                    "p50_ms": round(crowd["p50_ms"], 2),
                    "p99_ms": round(crowd["p99_ms"], 2),
                    "calls_per_s_1_client": round(alone["rate"], 1),
                    "p99_ms_1_client": round(alone["p99_ms"], 2),
                    "scaling_vs_1_client": round(ratio(crowd["rate"], alone["rate"]), 3),
                    "store_calls_per_s_in_process": round(in_process, 1),
                    "grpc_vs_in_process": round(ratio(crowd["rate"], in_process), 4),
                    "errors": crowd["errors"],
                }
            states = {JobState.CANCELLED.value}
            assert all(service.store.get_job(i).state.value in states for i in ids)
        finally:
            service.stop(drain=False)
    return {
        "benchmark": NAME,
        "clients": size.clients,
        "jobs_in_store": size.jobs,
        "seconds_per_measurement": size.seconds,
        "grpc_workers": settings.grpc_workers,
        **results,
    }


def _spec(pb: Any, i: int) -> Any:
    message = pb.JobSpec(name=f"bench-{i}")
    message.model.architecture, message.model.weights = "mobilenet_v3_small", "none"
    message.data.path = "ds"
    message.training.epochs, message.training.image_size, message.training.device = 1, 32, "cpu"
    message.logging.tensorboard = False
    message.logging.wandb.mode = "disabled"
    message.serving.enabled = False
    return message


def _wait_all_final(client: Any, pb: Any, ids: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    final = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
    while time.monotonic() < deadline:
        if all(client.GetJob(pb.GetJobRequest(job_id=i)).state in final for i in ids):
            return
        time.sleep(0.2)
    raise TimeoutError(f"jobs still not final after {timeout_s} s of cancelling")


def _load(
    target: str, pb_grpc: Any, call: Callable[[Any, int], Any], clients: int, seconds: float
) -> dict[str, Any]:
    """`clients` threads calling as fast as they can for `seconds`; rate and latency percentiles."""
    import grpc

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at: list[float] = []
    began: list[float] = []

    def set_clock() -> None:
        # The clock starts once every client is connected: on a loaded machine, connecting 32
        # channels can take longer than a whole short measurement.
        began.append(time.perf_counter())
        stop_at.append(began[0] + seconds)

    start = threading.Barrier(clients + 1, action=set_clock)

    def client(k: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            call(stub, k)  # connect before the clock starts
            start.wait()
            i = k
            while True:  # at least one timed call per client, however late it was scheduled
                t0 = time.perf_counter()
                try:
                    call(stub, i)
                except grpc.RpcError:
                    errors[k] += 1
                latencies[k].append(time.perf_counter() - t0)
                i += clients
                if time.perf_counter() >= stop_at[0]:
                    break

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began[0]
    flat = [x * 1000 for per in latencies for x in per]
    return {
        "rate": len(flat) / elapsed,
        "p50_ms": percentile(flat, 50),
        "p99_ms": percentile(flat, 99),
        "errors": sum(errors),
    }


def _local_rate(call: Callable[[int], Any], seconds: float) -> float:
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        call(count)
        count += 1
    return count / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else FULL))


if __name__ == "__main__":
    main()
