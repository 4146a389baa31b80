"""Tiny image datasets written into a test's tmp folder (shared by the training tests)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.spec import JobSpec

COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40))


def write_image(path: Path, colour: tuple[int, int, int], size: int = 32, seed: int = 0) -> Path:
    """A noisy image of one dominant colour (so classes are learnable), as PNG."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(0, 25, (size, size, 3)) + np.array(colour), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 32, seed_offset: int = 0
) -> Path:
    """root/class_<i>/<j>.png; returns root. Another seed_offset draws other noise (a held-out set)."""
    for c in range(classes):
        for j in range(per_class):
            seed = c * 1000 + j + seed_offset
            write_image(root / f"class_{c}" / f"{j}.png", COLOURS[c % len(COLOURS)], size, seed=seed)
    return root


CHANNELS = {"red": 0, "green": 1, "blue": 2}


def make_channel_labels(
    data_root: Path, folder: str, labels: tuple[str, ...] = ("red", "blue"), per_combination: int = 6
) -> list[str]:
    """Multi-label images: each label is its colour channel, bright (on) or dark (off), independently of
    the others, every combination (none included) per_combination times. Returns the manifest rows
    `path,label;label` (paths relative to data_root)."""
    rows = []
    for combination in itertools.product((False, True), repeat=len(labels)):
        present = sorted(label for label, on in zip(labels, combination, strict=True) if on)
        level = [220 if name in present else 40 for name in CHANNELS]
        colour = (level[0], level[1], level[2])
        for j in range(per_combination):
            path = Path(folder) / ("-".join(present) or "none") / f"{j}.png"
            write_image(data_root / path, colour, seed=len(rows))
            rows.append(f"{path},{';'.join(present)}")
    return rows


def write_truncated_png(path: Path, size: int = 32) -> Path:
    """A PNG whose header is fine but whose pixel data is cut off (fails only at decode)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: on a shared, busy machine several spinning threads run far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def job_spec(**overrides: Any) -> JobSpec:
    """A small, fast job spec: 32 px, no loggers, overridable per section."""
    spec: dict[str, Any] = {
        "name": "test-job",
        "model": {"architecture": "mobilenet_v3_small", "weights": "none"},
        "data": {"path": "ds", "val_fraction": 0.25},
        "training": {"epochs": 2, "batch_size": 8, "image_size": 32, "lr": 0.01, "augmentation": "light"},
        "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return JobSpec.model_validate(spec)
