"""The real thing, small: EfficientNet-Lite0 with its ImageNet weights, backbone frozen, fine-tuned on
scikit-learn's handwritten digits (8x8 grey, upsampled to 96 px RGB) on the CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.jobs.records import EventKind
from service.jobs.spec import JobSpec
from service.settings import Settings
from service.training.reporting import CollectingReporter
from service.training.runner import train

IMAGES = 500
SIZE = 96


def write_digits(folder: Path, count: int = IMAGES, size: int = SIZE) -> None:
    """folder/<digit>/<i>.png: dark digits on white, as RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images[:count], digits.target[:count], strict=True)):
        grey = (255 - pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{i:04d}.png")


@pytest.mark.slow
def test_efficientnet_lite0_learns_digits_with_a_frozen_backbone(tmp_path: Path) -> None:
    write_digits(tmp_path / "data" / "digits")
    spec = JobSpec.model_validate(
        {
            "name": "digits",
            "model": {"architecture": "efficientnet_lite0", "weights": "DEFAULT"},
            "data": {"path": "digits", "val_fraction": 0.2},
            "freeze": {"until_layer": "global_pool"},  # everything up to the classifier
            "training": {
                "epochs": 6,
                "batch_size": 32,
                "image_size": SIZE,
                "lr": 0.01,
                "augmentation": "none",  # a mirrored 2 is not a 2
                "scheduler": "cosine",
                "seed": 0,
            },
            "early_stopping": {"monitor": "val_accuracy", "patience": 3},
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
        }
    )
    settings = Settings(
        state_dir=tmp_path / "state", data_root=tmp_path / "data", torch_home=tmp_path / "torch"
    )
    reporter = CollectingReporter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning threads crawl on a shared, busy CPU
    started = time.monotonic()
    try:
        outcome = train(spec, tmp_path / "job", settings, reporter)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.monotonic() - started

    accuracy = outcome.metrics["val_accuracy"]
    epochs = [d for k, _, d in reporter.events if k == EventKind.EPOCH]
    print(
        f"\nEfficientNet-Lite0 on digits: val_accuracy {accuracy:.3f} (best of {len(epochs)} epochs, "
        f"per epoch {[round(e['val_accuracy'], 3) for e in epochs]}) in {elapsed:.0f} s"
    )
    assert outcome.status == "completed"
    assert reporter.fields["device"] == "cpu (fp32)"
    assert accuracy > 0.6, f"val accuracy {accuracy:.3f}; chance is 0.1"
