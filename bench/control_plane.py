"""Benchmark 5: GetJob, ListJobs, CreateJob and CancelJob calls per second and latency with 32 and 64 clients.

A real service (service.app.start_service: SQLite store, scheduler, gRPC server with its
interceptors) on loopback in this process, TorchServe off. Jobs are created and cancelled through
the API first, so the store holds real rows and no training competes for the CPU. Each client is a
thread with its own channel (its own HTTP/2 connection). The writes are measured as a user makes them:
each client loops CreateJob then CancelJob. Baselines in the same run: one client alone (the tail-latency
ratio the control plane's goals are set in) and, for the reads, the store call the RPC wraps, made
in-process (the API's overhead).

`--postgres-url URL` (an empty database: the service migrates it) runs the control plane on PostgreSQL
instead, as `--replicas N` real `run_service()` processes on that database (the clients spread over them,
client k on replica k mod N): how the control plane scales out on a machine with the cores for it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import emit, free_ports, make_image_folder, percentile, ratio

NAME = "control_plane"


Recorder = Callable[[str, Callable[[], Any]], Any]


@dataclass(frozen=True)
class Size:
    jobs: int
    seconds: float  # per measurement
    clients: tuple[int, ...] = (32, 64)


QUICK = Size(jobs=12, seconds=1.5)
FULL = Size(jobs=60, seconds=5.0)


def run(size: Size, postgres_url: str | None = None, replicas: int = 1) -> dict[str, Any]:
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
    from service.records import JobState

    if replicas > 1 and postgres_url is None:
        raise ValueError(
            "several replicas need a shared database: give --postgres-url (SQLite is one process's)"
        )
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        root = Path(tmp)
        make_image_folder(root / "data" / "ds", classes=2, per_class=4, size=32)
        max_queued = size.jobs + 2 * max(size.clients)
        places = (
            _replicas(root, postgres_url, replicas, max_queued)
            if postgres_url is not None
            else _in_process(root, max_queued)
        )
        with places as (targets, store, grpc_workers):
            # through every replica in turn: each has made creates and cancels (its first admission of
            # the model, its first job) before anything is timed, as the one in-process service has
            channels = [grpc.insecure_channel(target) for target in targets]
            try:
                stubs = [pb_grpc.FineTuningStub(channel) for channel in channels]
                ids = []
                for i in range(size.jobs):
                    stub = stubs[i % len(stubs)]
                    ids.append(stub.CreateJob(pb.CreateJobRequest(spec=_spec(pb, i))).id)
                for i, job_id in enumerate(ids):
                    stubs[i % len(stubs)].CancelJob(pb.CancelJobRequest(job_id=job_id))
                _wait_all_final(stubs[0], pb, ids)
            finally:
                for channel in channels:
                    channel.close()

            in_process = {
                "GetJob": _local_rate(lambda i: store.get_job(ids[i % len(ids)]), size.seconds / 2),
                "ListJobs": _local_rate(lambda i: store.list_jobs((), 50, ""), size.seconds / 2),
            }
            results: dict[str, Any] = {}
            # The clients run in a process of their own, as real clients do: 64 client threads in the
            # server's process would compete with it for the GIL and measure themselves.
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                for names, kind in (
                    (("GetJob",), "get"),
                    (("ListJobs",), "list"),
                    (("CreateJob", "CancelJob"), "write"),
                ):
                    alone = pool.submit(_load, targets[:1], kind, ids, 1, size.seconds).result()
                    crowds = {
                        n: pool.submit(_load, targets, kind, ids, n, size.seconds).result()
                        for n in size.clients
                    }
                    for name in names:
                        results[name] = _figures(name, alone, crowds, in_process.get(name))
            assert all(store.get_job(i).state == JobState.CANCELLED for i in ids)
    return {
        "benchmark": NAME,
        "store": "sqlite" if postgres_url is None else "postgresql",
        "replicas": replicas,
        "clients": list(size.clients),
        "jobs_in_store": size.jobs,
        "seconds_per_measurement": size.seconds,
        "grpc_workers": grpc_workers,
        **results,
    }


Places = Iterator[tuple[list[str], Any, int]]  # the replicas' addresses, a store on their database, threads


@contextlib.contextmanager
def _in_process(root: Path, max_queued: int) -> Places:
    """One service in this process on SQLite (the baseline every earlier figure was taken with)."""
    from service.app import start_service
    from service.settings import Settings

    settings = Settings(
        state_dir=root / "state", data_root=root / "data", torch_home=root / "torch", host="127.0.0.1",
        port=0, torchserve_enabled=False, max_concurrent_jobs=1, max_queued_jobs=max_queued,
    )  # fmt: skip
    service = start_service(settings)
    try:
        yield [f"127.0.0.1:{service.port}"], service.store, settings.grpc_workers
    finally:
        service.stop(drain=False)


@contextlib.contextmanager
def _replicas(root: Path, url: str, count: int, max_queued: int) -> Places:
    """`count` replicas, each `run_service()` in its own process, on the PostgreSQL database `url` and one
    shared state folder, as a Deployment runs them."""
    from bench.service_run import wait_line
    from service.jobs.store import JobStore
    from service.settings import Settings

    processes: list[subprocess.Popen[bytes]] = []
    try:
        ports = free_ports(count)
        for k, port in enumerate(ports):
            env = {name: value for name, value in os.environ.items() if not name.startswith("TUNESERVE_")}
            env |= {
                "TUNESERVE_STATE_DIR": str(root / "state"), "TUNESERVE_DATA_ROOT": str(root / "data"),
                "TUNESERVE_TORCH_HOME": str(root / "torch"), "TUNESERVE_DATABASE_URL": url,
                "TUNESERVE_REPLICA_ID": f"bench-{k}", "TUNESERVE_HOST": "127.0.0.1",
                "TUNESERVE_PORT": str(port),
                "TUNESERVE_TORCHSERVE_ENABLED": "false", "TUNESERVE_MAX_CONCURRENT_JOBS": "1",
                "TUNESERVE_MAX_QUEUED_JOBS": str(max_queued),
            }  # fmt: skip
            log = root / f"replica-{k}.log"
            with open(log, "wb") as out:
                command = [sys.executable, "-c", "from service.app import run_service; run_service()"]
                processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
        for k, process in enumerate(processes):  # they start side by side
            wait_line(root / f"replica-{k}.log", "tuneserve is serving on", 180, process)
        targets = [f"127.0.0.1:{port}" for port in ports]
        store = JobStore(url)
        try:
            yield targets, store, Settings.model_fields["grpc_workers"].default
        finally:
            store.close()
    finally:
        for process in processes:
            process.terminate()  # the service's own stop: its spare worker goes with it
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _figures(
    name: str,
    alone: dict[str, dict[str, Any]],
    crowds: dict[int, dict[str, dict[str, Any]]],
    local: float | None,
) -> dict[str, Any]:
    """One RPC's figures: one client alone, then each crowd, with ratios against the client alone."""
    one = alone[name]
    figures: dict[str, Any] = {
        "calls_per_s_1_client": round(one["rate"], 1),
        "p99_ms_1_client": round(one["p99_ms"], 2),
    }
    for n, crowd in crowds.items():
        c = crowd[name]
        figures |= {
            f"calls_per_s_{n}_clients": round(c["rate"], 1),
            f"p50_ms_{n}_clients": round(c["p50_ms"], 2),
            f"p99_ms_{n}_clients": round(c["p99_ms"], 2),
            f"p99_vs_1_client_{n}_clients": round(ratio(c["p99_ms"], one["p99_ms"]), 2),
            f"errors_{n}_clients": c["errors"],
        }
    first = crowds[min(crowds)][name]
    figures |= {"p50_ms": round(first["p50_ms"], 2), "p99_ms": round(first["p99_ms"], 2)}
    if local is not None:
        figures |= {
            "store_calls_per_s_in_process": round(local, 1),
            "store_ms_per_call_in_process": round(1000 / local, 3),
            "grpc_vs_in_process": round(ratio(first["rate"], local), 4),
        }
    figures["errors"] = one["errors"] + sum(c[name]["errors"] for c in crowds.values())
    return figures


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


def _calls(kind: str, ids: list[str]) -> Callable[[Any, int, Recorder], None]:
    """What one client does in a loop: `call(stub, i, record)` makes its RPCs and records each one."""
    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb

    def get(stub: Any, i: int, record: Recorder) -> None:
        record("GetJob", lambda: stub.GetJob(pb.GetJobRequest(job_id=ids[i % len(ids)])))

    def list_jobs(stub: Any, i: int, record: Recorder) -> None:
        record("ListJobs", lambda: stub.ListJobs(pb.ListJobsRequest(page_size=50)))

    def create_cancel(stub: Any, i: int, record: Recorder) -> None:
        # what a busy user does: submit, then change their mind; each client keeps at most one job
        # queued, so the queue limit is never what is measured
        job = record("CreateJob", lambda: stub.CreateJob(pb.CreateJobRequest(spec=_spec(pb, i))))
        if job is not None:
            record("CancelJob", lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job.id)))

    return {"get": get, "list": list_jobs, "write": create_cancel}[kind]


def _load(
    targets: list[str], kind: str, ids: list[str], clients: int, seconds: float
) -> dict[str, dict[str, Any]]:
    """`clients` threads looping one kind of call as fast as they can for `seconds`, client k on
    targets[k mod len]; per RPC the rate and latency percentiles. Runs in the clients' process."""
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc

    call = _calls(kind, ids)

    latencies: list[dict[str, list[float]]] = [{} for _ in range(clients)]
    errors: list[dict[str, int]] = [{} for _ in range(clients)]
    stop_at: list[float] = []
    began: list[float] = []

    def set_clock() -> None:
        # The clock starts once every client is connected: on a loaded machine, connecting 32
        # channels can take longer than a whole short measurement.
        began.append(time.perf_counter())
        stop_at.append(began[0] + seconds)

    start = threading.Barrier(clients + 1, action=set_clock)

    def client(k: int) -> None:
        def record(name: str, work: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return work()
            except grpc.RpcError:
                errors[k][name] = errors[k].get(name, 0) + 1
                return None
            finally:
                latencies[k].setdefault(name, []).append(time.perf_counter() - t0)

        with grpc.insecure_channel(targets[k % len(targets)]) as channel:
            stub = pb_grpc.FineTuningStub(channel)
            grpc.channel_ready_future(channel).result(timeout=30)  # connect before the clock starts
            start.wait()
            i = k
            while True:  # at least one timed loop per client, however late it was scheduled
                call(stub, i, record)
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
    names = {name for per in latencies for name in per}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        flat = [x * 1000 for per in latencies for x in per.get(name, [])]
        out[name] = {
            "rate": len(flat) / elapsed,
            "p50_ms": percentile(flat, 50),
            "p99_ms": percentile(flat, 99),
            "errors": sum(e.get(name, 0) for e in errors),
        }
    return out


def _local_rate(call: Callable[[int], Any], seconds: float) -> float:
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        call(count)
        count += 1
    return count / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--postgres-url", help="run on this (empty) PostgreSQL database instead of SQLite")
    parser.add_argument(
        "--replicas", type=int, default=1, help="with --postgres-url: replicas to spread over"
    )
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else FULL, args.postgres_url, args.replicas))


if __name__ == "__main__":
    main()
