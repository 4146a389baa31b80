"""Benchmark 4: TorchServe REST throughput and p50/p99 latency at concurrency 1, 8 and 32, with and
without dynamic batching, against the same model called in-process.

The model is a real job's best checkpoint (a tiny mobilenet_v3_small trained here for one epoch),
packaged and deployed by service.packaging's TorchServeBackend twice: `single` (batch_size 1) and
`batched` (batch_size 8, max_batch_delay 5 ms). Requests are one PNG each, through TorchServe's REST
inference API with its token. The baseline: the handler (handlers.inference.ImageClassifier) called
in this process, one image at a time, which is what a request costs without any server around it.

`exported_vs_service` (bench/serving_export.py): the same checkpoint exported and served by plain
TorchServe (KServe's command) vs a serving replica (`tuneserve serve --serving-only`): cold start of
each and their req/s ratio at concurrency 32. `--only-export` runs that part alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import free_ports, make_image_folder, percentile, png_bytes, ratio, torch_threads
from bench.serving_export import compare, load

NAME = "serving"
CONCURRENCY = (1, 8, 32)
MODES = {"single": (1, 0), "batched": (8, 5)}  # name -> (batch_size, max_batch_delay_ms)


def run(*, quick: bool, only_export: bool = False) -> dict[str, Any]:
    import torch

    from handlers.inference import ImageClassifier
    from service.packaging.torchserve_backend import TorchServeBackend
    from service.packaging.ts_config import inference_url
    from service.settings import Settings
    from service.spec import ServingSpec

    requests_per_client = 6 if quick else 40
    images = [png_bytes(i) for i in range(16)]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp, torch_threads(1):
        root = Path(tmp)
        checkpoint = trained_checkpoint(root)
        export_rounds, export_per_client = (2, 3) if quick else (6, 10)
        if only_export:
            export = compare(checkpoint, root, images, rounds=export_rounds, per_client=export_per_client)
            return {
                "benchmark": NAME,
                "requests_per_client": export_per_client,
                "exported_vs_service": export,
            }
        ports = free_ports(5)
        settings = Settings.model_validate(
            {
                "state_dir": root / "state",
                "torchserve_inference_port": ports[0],
                "torchserve_management_port": ports[1],
                "torchserve_metrics_port": ports[2],
                "torchserve_grpc_inference_port": ports[3],
                "torchserve_grpc_management_port": ports[4],
                "torchserve_java_heap": "256m",
                "torchserve_start_timeout_s": 180,
            }
        )
        classifier = ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))
        in_process = _in_process(classifier, images, 20 if quick else 200)
        backend = TorchServeBackend(settings, worker_threads=1)
        backend.start()
        try:
            results: dict[str, Any] = {}
            for mode, (batch_size, delay_ms) in MODES.items():
                serving = ServingSpec(model_name=mode, batch_size=batch_size, max_batch_delay_ms=delay_ms)
                archive = backend.package(checkpoint, mode)
                backend.deploy(archive, job_id=f"bench-{mode}", checkpoint=checkpoint, serving=serving)
                url = f"{inference_url(settings)}/predictions/{mode}"
                key = backend.process.keys().inference
                load(url, key, images, 1, 3)  # warm-up: the worker's first calls are slower
                results[mode] = {f"c{c}": load(url, key, images, c, requests_per_client) for c in CONCURRENCY}
                for stats in results[mode].values():
                    stats["throughput_vs_in_process"] = round(
                        ratio(stats["req_per_s"], in_process["req_per_s"]), 3
                    )
        finally:
            backend.stop()
        export = compare(checkpoint, root, images, rounds=export_rounds, per_client=export_per_client)
    return {
        "benchmark": NAME,
        "model": "mobilenet_v3_small (random init, 1 epoch), 64 px PNG requests",
        "requests_per_client": requests_per_client,
        "in_process": in_process,
        **results,
        "exported_vs_service": export,
    }


def trained_checkpoint(root: Path) -> Path:
    from service.settings import Settings
    from service.spec import JobSpec
    from service.training.reporting import CollectingReporter
    from service.training.runner import train

    make_image_folder(root / "data" / "ds", classes=3, per_class=6, size=40)
    spec = JobSpec.model_validate(
        {
            "name": "bench-serving",
            "model": {"architecture": "mobilenet_v3_small", "weights": "none"},
            "data": {"path": "ds", "val_fraction": 0.34},
            "training": {
                "epochs": 1,
                "batch_size": 4,
                "image_size": 64,
                "augmentation": "none",
                "device": "cpu",
            },
            "early_stopping": {"enabled": False},
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
            "serving": {"enabled": False},
        }
    )
    settings = Settings(state_dir=root / "train", data_root=root / "data", torch_home=root / "torch")
    outcome = train(spec, root / "job", settings, CollectingReporter())
    assert outcome.best_checkpoint is not None
    return outcome.best_checkpoint


def _in_process(classifier: Any, images: list[bytes], count: int) -> dict[str, float]:
    latencies = []
    began = time.perf_counter()
    for i in range(count):
        started = time.perf_counter()
        classifier.handle([{"data": images[i % len(images)]}])
        latencies.append((time.perf_counter() - started) * 1000)
    elapsed = time.perf_counter() - began
    return {
        "req_per_s": round(count / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-export", action="store_true", help="only the exported-vs-service part")
    args = parser.parse_args(argv)
    from bench.common import emit

    emit(run(quick=args.quick, only_export=args.only_export))


if __name__ == "__main__":
    main()
