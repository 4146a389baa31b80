"""Benchmark: DDP on this machine's CPU, 2 processes (gloo) against 1, the same global batch.

  python -m bench.ddp [--quick]

The real training engine (service.training.runner.train) on a tiny ConvNeXt (LayerNorm, no dropout, no
BatchNorm), every block trained, augmentation off, feature cache off. One process with as many torch
threads as the two ranks have together (and with one), against two ranks of one thread each.
`images_per_s`: steps x global batch / rank 0's epoch time (with validation), median over the epochs after
the first.
`ratio` = 2 processes / 1 process (expect < 1 on a 2-core machine: it is the overhead of DDP here).
`equivalence_max_abs`: the largest difference between the two runs' final parameters (same sample order).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.common import emit, free_ports, make_image_folder, ratio

NAME = "ddp"


@dataclass(frozen=True)
class Size:
    per_class: int
    image_size: int
    batch_size: int
    epochs: int


QUICK = Size(per_class=20, image_size=32, batch_size=16, epochs=2)
FULL = Size(per_class=80, image_size=64, batch_size=32, epochs=4)


def job(size: Size, world_size: int) -> Any:
    from service.spec import JobSpec

    return JobSpec.model_validate(
        {
            "name": "bench-ddp",
            "model": {"architecture": "timm/convnext_atto", "weights": "none"},
            "data": {"path": "ds", "val_fraction": 0.2},
            "training": {
                "epochs": size.epochs, "batch_size": size.batch_size, "image_size": size.image_size,
                "lr": 1e-3, "augmentation": "none", "feature_cache": False, "device": "cpu",
            },
            "early_stopping": {"enabled": False},
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
            "resources": {"gpus": 0, "processes_per_node": world_size},
        }
    )  # fmt: skip


def train_once(
    root: Path, folder: str, size: Size, rank: int = 0, world_size: int = 1
) -> list[dict[str, Any]]:
    """One process's training (one rank of `world_size`); rank 0's EPOCH events."""
    from service.records import EventKind
    from service.settings import Settings
    from service.training.distributed import Ranks
    from service.training.reporting import CollectingReporter
    from service.training.runner import train

    settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
    reporter = CollectingReporter()
    train(job(size, world_size), root / folder, settings, reporter, Ranks(rank, rank, world_size))
    return [d for k, _, d in reporter.events if k == EventKind.EPOCH]


def _rank(rank: int, root: Path, size: Size, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    epochs = train_once(root, "two", size, rank, 2)
    if rank == 0:
        results.put(epochs)


def images_per_s(epochs: list[dict[str, Any]], batch_size: int) -> float:
    """Images trained per second of epoch (steps x global batch), the first epoch left out (warm-up)."""
    timed = epochs[1:] or epochs
    return statistics.median(e["steps"] * batch_size / e["epoch_time_s"] for e in timed)


def run(size: Size) -> dict[str, Any]:
    from service.training.checkpoints import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_image_folder(root / "data" / "ds", classes=2, per_class=size.per_class, size=size.image_size + 8)
        threads = torch.get_num_threads()
        one: dict[int, list[dict[str, Any]]] = {}
        try:
            for count in (1, 2):  # the two ranks' threads together, and one rank's
                torch.set_num_threads(count)
                one[count] = train_once(root, f"one-{count}", size)
        finally:
            torch.set_num_threads(threads)
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_rank, args=(root, size, free_ports(1)[0], results), nprocs=2, join=True)
        two = results.get()
        single = load_checkpoint(root / "one-2/checkpoints/last.pt")["model"]
        ddp = load_checkpoint(root / "two/checkpoints/last.pt")["model"]
        worst = max((single[k].double() - ddp[k].double()).abs().max().item() for k in single)
    speed = {count: images_per_s(epochs, size.batch_size) for count, epochs in one.items()}
    two_speed = images_per_s(two, size.batch_size)
    return {
        "benchmark": NAME,
        "model": "timm/convnext_atto",
        "image_size": size.image_size,
        "global_batch": size.batch_size,
        "steps_per_epoch": two[-1]["steps"],
        "epochs": size.epochs,
        "one_process": {"threads_2_images_per_s": speed[2], "threads_1_images_per_s": speed[1]},
        "two_processes": {"threads_each": 1, "backend": "gloo", "images_per_s": two_speed},
        "ratio": ratio(two_speed, speed[2]),  # against one process using both cores
        "ratio_vs_one_thread": ratio(two_speed, speed[1]),
        "equivalence_max_abs": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    emit(run(QUICK if parser.parse_args().quick else FULL))


if __name__ == "__main__":
    main()
