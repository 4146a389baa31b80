"""Would grpc.aio serve GetJob better than the threaded server? And how far can gRPC Python go here at all?

The real service (SQLite, interceptors, scheduler) serves GetJob through its threaded gRPC server. In the
same process, on the same JobManager, two grpc.aio servers serve the same RPC: one with GetJob an
`async def` run inline on the event loop (the conversion an aio port would make of the hot reads), one
with GetJob left a plain `def`, which grpc.aio runs in its thread pool (what every RPC not converted
would become in a partial port). Each aio server has an interceptor that reads the call's metadata, as
the service's auth does. Two more threaded servers bound what tuning could reach: the service's own
server (`build_server`, interceptors and all) with 4 worker threads instead of TUNESERVE_GRPC_WORKERS,
and the floor: a threaded server with no interceptors whose GetJob returns one fixed, pre-built Job
message (no store, no conversion): what gRPC Python itself costs on this machine, with the clients on
its cores. The clients are those of bench.control_plane (threads with a channel each, in a process of
their own), in interleaved rounds (each starting with another server, after one warm-up round); ratios
are against the threaded server in the same round. Each round also times one client alone on the
threaded server and on the floor, so the tail's growth with the crowd (issue 16 asks for <= 10x) is
seen where no code of ours runs. Not quite like for like: the threaded servers run the service's auth
and error interceptors, the aio ones a stand-in that reads the metadata.

Not a runtime component: it decides whether porting the API to grpc.aio, or tuning the worker threads,
is worth it on a given machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import tempfile
import threading
from concurrent import futures
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import emit, make_image_folder, median, ratio
from bench.control_plane import _load, _spec, _wait_all_final

NAME = "grpc_aio"


def run(rounds: int, clients: int, seconds: float, jobs_stored: int = 60) -> dict[str, Any]:
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
    from service.api.server import build_server
    from service.app import start_service
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-aio-") as tmp:
        root = Path(tmp)
        make_image_folder(root / "data" / "ds", classes=2, per_class=4, size=32)
        settings = Settings(
            state_dir=root / "state", data_root=root / "data", torch_home=root / "torch", host="127.0.0.1",
            port=0, torchserve_enabled=False, max_concurrent_jobs=1, max_queued_jobs=200,
        )  # fmt: skip
        service = start_service(settings)
        try:
            targets = [f"127.0.0.1:{service.port}"]
            with grpc.insecure_channel(targets[0]) as channel:
                stub = pb_grpc.FineTuningStub(channel)
                ids = [stub.CreateJob(pb.CreateJobRequest(spec=_spec(pb, i))).id for i in range(jobs_stored)]
                for job_id in ids:
                    stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
                _wait_all_final(stub, pb, ids)
            jobs = service.server.jobs
            # each server is stopped however far the setup got (LIFO), the service last
            with contextlib.ExitStack() as started:
                aio_targets, stop = _aio_servers(jobs)
                started.callback(stop)
                # the service's own server (its interceptors, the same JobManager), with 4 worker threads
                few = build_server(settings.model_copy(update={"grpc_workers": 4, "port": 0}), jobs)
                started.callback(few.server.stop, None)
                fixed_reply = _a_job(targets[0], ids[0])
                floor, floor_port = _floor_server(fixed_reply)
                started.callback(floor.stop, None)
                servers = {
                    "threaded": targets[0],
                    **aio_targets,
                    "threaded_4_workers": f"127.0.0.1:{few.port}",
                    "floor": f"127.0.0.1:{floor_port}",
                }
                alone = ("threaded", "floor")
                per_round: list[dict[str, dict[str, float]]] = []
                kinds = list(servers)
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    for r in range(rounds + 1):  # the first round warms up and is left out
                        # each round starts with another server: a load fading during a round favours none
                        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
                        figures = {
                            kind: pool.submit(_load, [servers[kind]], "get", ids, clients, seconds).result()[
                                "GetJob"
                            ]
                            for kind in order
                        }
                        for kind in alone:
                            figures[f"{kind}_1_client"] = pool.submit(
                                _load, [servers[kind]], "get", ids, 1, seconds
                            ).result()["GetJob"]
                        if r > 0:
                            per_round.append(figures)
        finally:
            service.stop(drain=False)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "clients": clients,
        "rounds": rounds,
        "seconds": seconds,
        "floor_reply_bytes": fixed_reply.ByteSize(),
    }
    for kind in servers:
        rates = [r[kind]["rate"] for r in per_round]
        result[kind] = {
            "calls_per_s": [round(x, 1) for x in rates],
            "p99_ms": [round(r[kind]["p99_ms"], 2) for r in per_round],
            "errors": sum(r[kind]["errors"] for r in per_round),
        }
        if kind != "threaded":
            vs = [ratio(r[kind]["rate"], r["threaded"]["rate"]) for r in per_round]
            result[kind]["calls_per_s_vs_threaded"] = [round(x, 3) for x in vs]
            result[kind]["calls_per_s_vs_threaded_median"] = round(median(vs), 3)
        if kind in alone:
            one = [r[f"{kind}_1_client"]["p99_ms"] for r in per_round]
            grown = [ratio(r[kind]["p99_ms"], r[f"{kind}_1_client"]["p99_ms"]) for r in per_round]
            result[kind]["p99_ms_1_client"] = [round(x, 2) for x in one]
            result[kind][f"p99_vs_1_client_{clients}_clients"] = [round(x, 2) for x in grown]
            result[kind]["errors"] += sum(r[f"{kind}_1_client"]["errors"] for r in per_round)
    return result


def _a_job(target: str, job_id: str) -> Any:
    """The Job message GetJob answers for `job_id`, as the service sends it (the floor's fixed reply)."""
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        return pb_grpc.FineTuningStub(channel).GetJob(pb.GetJobRequest(job_id=job_id))


def _floor_server(reply: Any) -> tuple[Any, int]:
    """A threaded server (as many workers as the service's default) answering every GetJob with `reply`:
    no interceptors, no store, no conversion. The server and its port."""
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
    from service.settings import Settings

    class Fixed(pb_grpc.FineTuningServicer):
        def GetJob(self, request: Any, context: Any) -> Any:
            return reply

    workers = Settings.model_fields["grpc_workers"].default
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="floor-grpc"))
    pb_grpc.add_FineTuningServicer_to_server(Fixed(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _aio_servers(jobs: Any) -> tuple[dict[str, str], Any]:
    """Two grpc.aio servers on one event loop thread (grpc.aio wants one loop per process), serving
    GetJob from `jobs`: inline on the loop, and in the server's thread pool; their addresses and a stop."""
    import grpc

    from service.access.clients import ANONYMOUS
    from service.api import convert
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc

    class ReadsMetadata(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            dict(details.invocation_metadata or ()).get("authorization")
            return await continuation(details)

    class Inline(pb_grpc.FineTuningServicer):
        async def GetJob(self, request: Any, context: Any) -> Any:
            return convert.job_to_proto(jobs.get(request.job_id, ANONYMOUS))

    class InThreadPool(pb_grpc.FineTuningServicer):
        def GetJob(self, request: Any, context: Any) -> Any:
            return convert.job_to_proto(jobs.get(request.job_id, ANONYMOUS))

    loop = asyncio.new_event_loop()
    started = threading.Event()
    targets: dict[str, str] = {}
    servers: list[Any] = []
    done = asyncio.Event()

    async def serve() -> None:
        for kind, servicer in (("aio_inline", Inline()), ("aio_thread_pool", InThreadPool())):
            pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"{kind}-grpc")
            server = grpc.aio.server(pool, interceptors=[ReadsMetadata()])
            pb_grpc.add_FineTuningServicer_to_server(servicer, server)
            targets[kind] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            await server.start()
            servers.append(server)
        started.set()
        await done.wait()
        for server in servers:
            await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(60):
        raise RuntimeError("the grpc.aio servers did not start within 60 s")

    def stop() -> None:
        loop.call_soon_threadsafe(done.set)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()

    return targets, stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    emit(run(args.rounds, args.clients, args.seconds))


if __name__ == "__main__":
    main()
