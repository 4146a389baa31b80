"""Predictions of a served model while another model's version loads: TorchServe's synchronous
registration (what the service did before) against ours (registered, then its workers polled).

One real TorchServe (service.packaging's TorchServeBackend) serves `steady`. For each round and each
way of registering, a version of another model is registered whose handler does not finish loading
until `--hold-s` seconds have passed (its first import waits for a file the bench writes then).
Meanwhile the bench sends `--predictions` predictions to `steady` one after another, each on a new
connection (so each lands on the next of TorchServe's Netty threads). A synchronous registration
waits for the workers on one of those threads, and the requests of every connection that thread owns
wait with it. Printed per way: latency p50 / p99 / max and how many took over `STALLED_S`; the ratio
is ours over synchronous, in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import emit, free_ports, percentile, png_bytes, ratio, torch_threads
from bench.serving import trained_checkpoint

NAME = "deploy_stall"
STALLED_S = 1.0  # a prediction of this tiny model takes ~15-20 ms on the 2-core machine
UNPACKED_S = 1.5  # registration -> the version's worker loading (TorchServe unpacks in ~0.3 s)
WAYS = ("synchronous", "ours")
FULL: dict[str, Any] = {"rounds": 2, "predictions": 16, "hold_s": 3.0}
QUICK: dict[str, Any] = {"rounds": 1, "predictions": 8, "hold_s": 2.0}


def archive_with_handler_prelude(source: Path, target: Path, prelude: str) -> None:
    """A copy of the archive `source` at `target` whose TorchServe handler module runs `prelude`
    first when a worker imports it (after `from __future__`, which must stay the first statement)."""
    future = b"from __future__ import annotations\n"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "tuneserve_handler.py":
                data = data.replace(future, future + prelude.encode(), 1)
            copy.writestr(item, data)


def wait_for_file_prelude(release: Path) -> str:
    return f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"


def run(*, rounds: int, predictions: int, hold_s: float) -> dict[str, Any]:
    from service.packaging.archiver import build_archive
    from service.packaging.torchserve_backend import TorchServeBackend
    from service.packaging.ts_config import inference_url
    from service.settings import Settings
    from service.spec import ServingSpec

    image = png_bytes(0)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-stall-") as tmp, torch_threads(1):
        root = Path(tmp)
        checkpoint = trained_checkpoint(root)
        names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
        ports = {f"torchserve_{n}_port": p for n, p in zip(names, free_ports(5), strict=True)}
        settings = Settings.model_validate(
            {"state_dir": root / "state", **ports, "torchserve_java_heap": "256m",
             "torchserve_start_timeout_s": 180}
        )  # fmt: skip
        backend = TorchServeBackend(settings, worker_threads=1)
        backend.start()
        try:
            serving = ServingSpec(model_name="steady", batch_size=1, max_batch_delay_ms=0, workers=1)
            backend.deploy(backend.package(checkpoint, "steady"), job_id="bench", checkpoint=checkpoint,
                           serving=serving)  # fmt: skip
            url = f"{inference_url(settings)}/predictions/steady"
            key = backend.process.keys().inference
            predict = _predictor(url, key, image)
            for _ in range(3):  # warm-up: the worker's first calls are slower
                predict()
            latencies: dict[str, list[float]] = {way: [] for way in WAYS}
            for r in range(rounds):
                for way in WAYS:
                    name = f"loading{r}{way[0]}"
                    release = root / f"release-{name}"
                    staged = build_archive(checkpoint, root / "staging", name, "1")
                    archive_with_handler_prelude(
                        staged.path, settings.model_store / staged.path.name, wait_for_file_prelude(release)
                    )
                    register = _registration(backend, way, staged.path.name, name)
                    loading = threading.Thread(target=register, name=f"register-{name}", daemon=True)
                    loading.start()
                    # not TorchServe's management API to see it listed: with a synchronous
                    # registration under way, that call may be one of those that wait
                    time.sleep(UNPACKED_S)
                    threading.Timer(hold_s, release.touch).start()
                    latencies[way] += [predict() for _ in range(predictions)]
                    release.touch()
                    loading.join(timeout=300)
                    backend.management.unregister_quietly(name, "1")
        finally:
            backend.stop()
    result: dict[str, Any] = {
        "benchmark": NAME, "rounds": rounds, "predictions_per_round": predictions, "hold_s": hold_s,
        "stalled_over_s": STALLED_S,
    }  # fmt: skip
    for way, values in latencies.items():
        result[way] = {
            "p50_ms": round(percentile(values, 50) * 1000, 1),
            "p99_ms": round(percentile(values, 99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
            "stalled": sum(v > STALLED_S for v in values),
            "predictions": len(values),
        }
    result["p99_ours_vs_synchronous"] = round(
        ratio(result["ours"]["p99_ms"], result["synchronous"]["p99_ms"]), 3
    )
    return result


def _predictor(url: str, key: str, image: bytes) -> Callable[[], float]:
    def predict() -> float:
        """Seconds for one prediction on a connection of its own."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
        started = time.monotonic()
        request = urllib.request.Request(url, data=image, headers=headers)
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
        return time.monotonic() - started

    return predict


def _registration(backend: Any, way: str, archive: str, name: str) -> Callable[[], None]:
    management = backend.management
    if way == "ours":

        def register_then_poll() -> None:
            management.register(archive, name, batch_size=1, max_batch_delay_ms=0, workers=1)
            management.wait_ready(name, "1", 300)

        return register_then_poll
    query = {"url": archive, "model_name": name, "batch_size": 1, "max_batch_delay": 0,
             "initial_workers": 1, "synchronous": "true"}  # fmt: skip
    return lambda: management.rest.call("POST", "/models", query=query, timeout_s=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=FULL["rounds"])
    parser.add_argument("--predictions", type=int, default=FULL["predictions"])
    parser.add_argument("--hold-s", type=float, default=FULL["hold_s"])
    parser.add_argument("--quick", action="store_true", help="1 round of 8 predictions, held 2 s")
    args = parser.parse_args()
    sizes = QUICK if args.quick else {"rounds": args.rounds, "predictions": args.predictions,
                                      "hold_s": args.hold_s}  # fmt: skip
    emit(run(**sizes))


if __name__ == "__main__":
    main()
