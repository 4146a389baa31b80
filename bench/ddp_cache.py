"""Benchmark: the frozen-feature cache under DDP, 2 CPU processes (gloo), cached features against images.

  python -m bench.ddp_cache [--quick]

The real training engine on mobilenet_v3_small (random init), every feature block frozen (BatchNorm
policy eval), augmentation off, so the prefix's outputs may be cached: each rank runs the prefix over
its shard once and the ranks exchange the features. Both runs take the same per-rank batches.
`images_per_s`: steps x global batch / rank 0's epoch time, median over the epochs after the first (the
first holds the caching pass). `ratio` = cached / images (> 1: the cache pays).
`first_epoch_ratio`: the same for the first epoch alone. `equivalence_max_abs`: the largest difference
between the two runs' final parameters.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.common import emit, free_ports, make_image_folder, ratio
from bench.ddp import images_per_s

NAME = "ddp_cache"
QUICK = {"per_class": 24, "image_size": 64, "batch_size": 16, "epochs": 3}
FULL = {"per_class": 80, "image_size": 96, "batch_size": 32, "epochs": 4}


def job(size: dict[str, int], cache: bool) -> Any:
    from service.spec import JobSpec

    return JobSpec.model_validate(
        {
            "name": "bench-ddp-cache",
            "model": {"architecture": "mobilenet_v3_small", "weights": "none"},
            "data": {"path": "ds", "val_fraction": 0.2},
            "freeze": {"until_layer": "features.12"},
            "training": {
                "epochs": size["epochs"], "batch_size": size["batch_size"], "image_size": size["image_size"],
                "optimizer": "sgd", "lr": 0.01, "augmentation": "none", "feature_cache": cache,
                "device": "cpu",
            },
            "early_stopping": {"enabled": False},
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
            "resources": {"gpus": 0, "processes_per_node": 2},
        }
    )  # fmt: skip


def _rank(rank: int, root: Path, size: dict[str, int], cache: bool, port: int, results: Any) -> None:
    from service.records import EventKind
    from service.settings import Settings
    from service.training.distributed import Ranks
    from service.training.reporting import CollectingReporter
    from service.training.runner import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
    reporter = CollectingReporter()
    folder = root / ("cached" if cache else "images")
    train(job(size, cache), folder, settings, reporter, Ranks(rank, rank, 2))
    if rank == 0:
        results.put([d for k, _, d in reporter.events if k == EventKind.EPOCH])


def run(size: dict[str, int]) -> dict[str, Any]:
    from service.training.checkpoints import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_image_folder(
            root / "data" / "ds", classes=2, per_class=size["per_class"], size=size["image_size"]
        )
        epochs: dict[bool, list[dict[str, Any]]] = {}
        for cache in (True, False):
            results = mp.get_context("spawn").SimpleQueue()
            mp.spawn(_rank, args=(root, size, cache, free_ports(1)[0], results), nprocs=2, join=True)
            epochs[cache] = results.get()
        cached = load_checkpoint(root / "cached/checkpoints/last.pt")["model"]
        images = load_checkpoint(root / "images/checkpoints/last.pt")["model"]
        worst = max((cached[k].double() - images[k].double()).abs().max().item() for k in images)
    batch = size["batch_size"]
    speed = {cache: images_per_s(found, batch) for cache, found in epochs.items()}
    first = {cache: found[0]["steps"] * batch / found[0]["epoch_time_s"] for cache, found in epochs.items()}
    return {
        "benchmark": NAME,
        "model": "mobilenet_v3_small (features frozen)",
        "processes": 2,
        "backend": "gloo",
        **size,
        "cached_images_per_s": speed[True],
        "images_images_per_s": speed[False],
        "ratio": ratio(speed[True], speed[False]),
        "first_epoch_ratio": ratio(first[True], first[False]),
        "equivalence_max_abs": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    emit(run(QUICK if parser.parse_args().quick else FULL))


if __name__ == "__main__":
    main()
