"""Benchmark 2: the frozen-feature cache: epochs after the first, against the same training without it.

Drives the real set-up: prepare() builds the run from a JobSpec (head-only fine-tune: everything
but the classifier frozen, augmentation `none`, BatchNorm `eval`, so the cache is valid), then each
epoch takes Run.training_batches() (cached prefix outputs, or images) into train_one_epoch, timed
alone (evaluation is the same either way). The uncached run is the same spec with
training.feature_cache false. Also checks both runs train alike (losses within float tolerance).
Goal: at least 10x.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import device_name, emit, make_image_folder, median, ratio

NAME = "feature_cache"


@dataclass(frozen=True)
class Size:
    architecture: str
    image_size: int
    images_per_class: int
    batch_size: int
    epochs: int


QUICK = Size("resnet18", 64, 24, 16, 3)
FULL = Size("resnet18", 112, 80, 32, 4)
GPU = Size("resnet50", 224, 400, 256, 4)
HEAD_ONLY = {"resnet18": "avgpool", "resnet50": "avgpool"}  # every block before the classifier


def run(size: Size, workdir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(workdir or tmp)
        make_image_folder(
            root / "data" / "ds", classes=3, per_class=size.images_per_class, size=size.image_size
        )
        cached = _epoch_times(size, root, feature_cache=True)
        plain = _epoch_times(size, root, feature_cache=False)
    later_cached, later_plain = median(cached["epoch_s"][1:]), median(plain["epoch_s"][1:])
    losses = zip(cached["losses"], plain["losses"], strict=True)
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in losses)
    return {
        "benchmark": NAME,
        "device": device_name(),
        "model": size.architecture,
        "freeze": f"until_layer {HEAD_ONLY[size.architecture]} (head only)",
        "image_size": size.image_size,
        "train_images": cached["train_images"],
        "epochs": size.epochs,
        "cache_reported": cached["reported"],
        "first_epoch_s": {
            "cached": round(cached["epoch_s"][0], 4),
            "uncached": round(plain["epoch_s"][0], 4),
        },
        "later_epoch_s": {"cached": round(later_cached, 5), "uncached": round(later_plain, 4)},
        "speedup_later_epochs": round(ratio(later_plain, later_cached), 2),
        "max_rel_loss_diff": worst,
        "goal": 10.0,
    }


def _epoch_times(size: Size, root: Path, *, feature_cache: bool) -> dict[str, Any]:
    from service.records import EventKind
    from service.settings import Settings
    from service.spec import JobSpec
    from service.training import freezing
    from service.training.loop import EpochPlan, train_one_epoch
    from service.training.prepare import prepare
    from service.training.reporting import CollectingReporter

    spec = JobSpec.model_validate(
        {
            "name": "bench-cache",
            "model": {"architecture": size.architecture, "weights": "none"},
            "data": {"path": "ds", "val_fraction": 0.2},
            "freeze": {"until_layer": HEAD_ONLY[size.architecture], "batchnorm": "eval"},
            "training": {
                "epochs": size.epochs,
                "batch_size": size.batch_size,
                "image_size": size.image_size,
                "augmentation": "none",
                "optimizer": "sgd",
                "scheduler": "none",
                "feature_cache": feature_cache,
                "seed": 3,
            },
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
            "serving": {"enabled": False},
        }
    )
    settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
    reporter = CollectingReporter()
    run = prepare(spec, root / f"job-{feature_cache}", settings, reporter)
    times, losses = [], []
    for epoch in range(1, size.epochs + 1):
        freezing.set_train_mode(run.model, run.network.plan, spec.freeze.batchnorm)
        started = time.perf_counter()
        loader, trainer, _ = run.training_batches(epoch)  # the first cached epoch computes the cache here
        torch.manual_seed(epoch)
        trained = train_one_epoch(trainer, loader, EpochPlan(epoch, run.progress.step), reporter)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(trained.metrics["loss"])
        run.progress.step += trained.steps
    reported = any(k == EventKind.INFO and d.get("feature_cache") for k, _, d in reporter.events)
    assert all(math.isfinite(x) for x in losses), losses
    return {
        "epoch_s": times,
        "losses": losses,
        "reported": reported,
        "train_images": len(run.data.loaders.train_dataset),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else (GPU if torch.cuda.is_available() else FULL)))


if __name__ == "__main__":
    main()
