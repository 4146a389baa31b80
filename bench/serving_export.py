"""Benchmark 4b: the exported folder under plain TorchServe vs the service's own TorchServe.

Plain: exactly KServe's command, `torchserve --start --model-store <dir>/model-store --ts-config
<dir>/config/config.properties`, in a virtualenv where tuneserve does not import (the third-party
packages come through a .pth line: bench/plain_torchserve.py, which the tests use too). Service: a serving
replica, `python -m service.cli.main serve --serving-only --model-store <store>`, which runs the
service's TorchServe (TorchServeBackend) over the same archive. Both: batch 8, 50 ms, one worker with
one torch thread, no token, a 256 MB serial-GC heap.

Figures: cold start of each (process start -> first 200 answer, the model loaded on the way) and REST
req/s at concurrency 32. The load alternates between the two servers round by round (ABBA), so a busy
neighbour on a shared machine slows both alike; `req_per_s_ratio` is the median of the rounds'
service/plain ratios (about 1 expected: it is the same server).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import free_ports, percentile
from bench.plain_torchserve import plain_server, plain_virtualenv, running

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench"
CLIENTS = 32
START_TIMEOUT_S = 300.0


def compare(
    checkpoint: Path, root: Path, images: list[bytes], *, rounds: int, per_client: int
) -> dict[str, Any]:
    """Cold start and c32 throughput of plain TorchServe (exported folder) and of a serving replica."""
    from service.packaging.archiver import build_archive
    from service.packaging.export import export_archive
    from service.serving_types import ExportRequest

    store = root / "store"
    store.mkdir()
    archive = build_archive(checkpoint, store, MODEL, "1")
    export_archive(archive, ExportRequest(job_id="bench", target=root / "export", token_auth=False))
    with (
        plain_torchserve(root / "export", root / "plain") as plain,
        serving_replica(store, root / "replica") as own,
    ):
        urls = {
            name: f"{server['url']}/predictions/{MODEL}"
            for name, server in (("plain", plain), ("service", own))
        }
        for url in urls.values():
            load(url, "", images, CLIENTS, 3)  # warm-up: the JVM and the worker start slower
        rates: dict[str, list[float]] = {"plain": [], "service": []}
        errors = 0
        for r in range(rounds):
            for name in ("plain", "service") if r % 2 == 0 else ("service", "plain"):
                stats = load(urls[name], "", images, CLIENTS, per_client)
                rates[name].append(stats["req_per_s"])
                errors += stats["errors"]
        ratios = [s / p for s, p in zip(rates["service"], rates["plain"], strict=True) if p > 0]
        return {
            "cold_start_s": {"plain": plain["cold_start_s"], "service": own["cold_start_s"]},
            f"c{CLIENTS}_req_per_s": {name: round(statistics.median(v), 1) for name, v in rates.items()},
            f"c{CLIENTS}_rounds": rates,
            "req_per_s_ratio": round(statistics.median(ratios), 3) if ratios else 0.0,
            "errors": errors,
        }


@contextmanager
def plain_torchserve(exported: Path, run: Path) -> Iterator[dict[str, Any]]:
    """KServe's torchserve command on the exported folder, in a virtualenv without tuneserve."""
    venv = plain_virtualenv(run / "venv")
    server = plain_server(exported, run, venv, heap="256m", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    with running(server):
        cold = first_answer(server.url, started, lambda: True)
        yield {"url": server.url, "cold_start_s": round(cold, 2)}


@contextmanager
def serving_replica(store: Path, root: Path) -> Iterator[dict[str, Any]]:
    """`tuneserve serve --serving-only` over `store`, its own state folder under `root`."""
    root.mkdir()
    inference, management, metrics, grpc_inference, grpc_management, ready = free_ports(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TUNESERVE_STATE_DIR=str(root / "state"),
        TUNESERVE_TORCHSERVE_INFERENCE_PORT=str(inference),
        TUNESERVE_TORCHSERVE_MANAGEMENT_PORT=str(management),
        TUNESERVE_TORCHSERVE_METRICS_PORT=str(metrics),
        TUNESERVE_TORCHSERVE_GRPC_INFERENCE_PORT=str(grpc_inference),
        TUNESERVE_TORCHSERVE_GRPC_MANAGEMENT_PORT=str(grpc_management),
        TUNESERVE_TORCHSERVE_JAVA_HEAP="256m", TUNESERVE_TORCHSERVE_TOKEN_AUTH="false",
    )  # fmt: skip
    command = [
        sys.executable, "-m", "service.cli.main", "serve", "--serving-only", "--model-store", str(store),
        "--ready-port", str(ready),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{inference}"
    started = time.perf_counter()
    with open(root / "replica.log", "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        cold = first_answer(url, started, lambda: process.poll() is None)
        yield {"url": url, "cold_start_s": round(cold, 2)}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def load(url: str, key: str, images: list[bytes], clients: int, per_client: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_client):
            body = images[(k * per_client + i) % len(images)]
            headers = {"Content-Type": "application/octet-stream"}
            if key:  # "": a TorchServe without token authorization
                headers["Authorization"] = f"Bearer {key}"
            started = time.perf_counter()
            try:
                request = urllib.request.Request(url, data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
            except OSError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return {
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "errors": errors[0],
    }


def first_answer(url: str, started: float, alive: Callable[[], bool]) -> float:
    """Seconds from `started` until the model answers a prediction (polled every 50 ms)."""
    from bench.common import png_bytes

    image = png_bytes(0)
    while time.perf_counter() - started < START_TIMEOUT_S:
        if not alive():
            raise RuntimeError(f"the server behind {url} exited while starting")
        request = urllib.request.Request(
            f"{url}/predictions/{MODEL}", data=image, headers={"Content-Type": "application/octet-stream"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
                return time.perf_counter() - started
        except (urllib.error.URLError, OSError):  # refused while starting; 404/503 until the model is in
            time.sleep(0.05)
    raise RuntimeError(f"no answer from {url} within {START_TIMEOUT_S:.0f} s")
