"""What the GPU checks share: their sizes, their data (digits, real photos, JPEG folders), job specs, results.

The GPU machine has no scikit-learn: `bench/gpu.sh --fetch` copies scikit-learn's own digits file and
its two sample photos into build/gpu-data/, and this module reads them from there (or from an installed
scikit-learn, which is the same files).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent.parent / "build" / "gpu-data"
PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample images: real photographs, 427x640
LITE0 = "efficientnet_lite0"  # an accepted name before and after the builtin became tf_efficientnet_lite0


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the checks: `gpu` for the real thing, `cpu` for the dry run here."""

    name: str
    cuda: bool
    digits: int  # digit images in the Lite0 job
    digit_size: int  # pixels, after upsampling the 8x8 originals
    lite0_epochs: int
    speed_model: str  # the speed checks' model
    speed_image: int
    speed_batch: int
    speed_steps: int  # timed steps per measurement
    loop_steps: int  # loop_speed's steps per round
    loop_rounds: int
    cache_per_class: int  # images per class (3 classes) in the feature-cache check
    cache_epochs: int
    jpegs: int  # JPEGs written for the real-data check
    jpeg_size: int


GPU = Scale(
    "gpu",
    True,
    digits=1797,
    digit_size=96,
    lite0_epochs=4,
    speed_model="resnet50",
    speed_image=224,
    speed_batch=256,
    speed_steps=20,
    loop_steps=20,
    loop_rounds=5,
    cache_per_class=400,
    cache_epochs=4,
    jpegs=2000,
    jpeg_size=256,
)
CPU = Scale(
    "cpu",
    False,
    digits=150,
    digit_size=32,
    lite0_epochs=2,
    speed_model="resnet18",
    speed_image=32,
    speed_batch=8,
    speed_steps=3,
    loop_steps=3,
    loop_rounds=2,
    cache_per_class=16,
    cache_epochs=3,
    jpegs=64,
    jpeg_size=96,
)
SCALES = {"gpu": GPU, "cpu": CPU}


# ---------------------------------------------------------------------------------------------- results


def entry(check: str, kind: str, status: str, **values: Any) -> dict[str, Any]:
    """One line of the results: `status` is pass, fail, skipped, error, not available or not implemented."""
    return {"check": check, "kind": kind, "status": status, **values}


def passed(ok: bool) -> str:
    return "pass" if ok else "fail"


class ResultFile:
    """Entries appended as JSON lines as soon as each is known, so a check killed at its time limit
    still leaves what it had measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()

    def add(self, item: dict[str, Any]) -> None:
        item = {**item, "at_s": round(time.monotonic() - self.started, 1)}
        with self.path.open("a") as out:
            out.write(json.dumps(item, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- data


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: (1797, 8, 8) values 0-16 and (1797,) labels."""
    path = DATA_DIR / "digits.csv.gz"
    if not path.exists():
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.images, data.target
    with gzip.open(path, "rt") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def write_digits(folder: Path, count: int, size: int) -> Path:
    """folder/<digit>/<i>.png: dark digits on white, upsampled to `size`, as RGB (as the CPU test does)."""
    images, labels = digits()
    for i, (pixels, label) in enumerate(zip(images[:count], labels[:count], strict=True)):
        grey = (255 - pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{i:04d}.png")
    return folder


def digits_root(scale: Scale, workdir: Path) -> Path:
    """`workdir` as a data root holding data/digits (written once, shared by the checks)."""
    folder = workdir / "data" / "digits"
    if not folder.exists():  # written aside and renamed: a check killed mid-write leaves no half folder
        partial = workdir / "data" / f"digits-partial-{os.getpid()}"
        write_digits(partial, scale.digits, scale.digit_size)
        partial.rename(folder)
    return workdir


def photo_bytes() -> dict[str, bytes]:
    """The real photographs as their JPEG files' bytes."""
    found: dict[str, bytes] = {}
    for name in PHOTOS:
        path = DATA_DIR / name
        if not path.exists():
            import sklearn.datasets

            path = Path(sklearn.datasets.__file__).parent / "images" / name
        found[name] = path.read_bytes()
    return found


def write_jpeg_folder(folder: Path, count: int, size: int, classes: int = 4) -> Path:
    """folder/class_<c>/<i>.jpg: `count` JPEGs of size x size, crops of the real photos with noise, so
    the decoder sees photographic content rather than flat colour."""
    photos = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in photo_bytes().values()]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - size)) if photo.shape[0] > size else 0
        left = int(rng.integers(0, photo.shape[1] - size)) if photo.shape[1] > size else 0
        crop = photo[top : top + size, left : left + size].astype(np.int16)
        crop = np.clip(crop + rng.integers(-8, 9, crop.shape), 0, 255).astype(np.uint8)
        path = folder / f"class_{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).resize((size, size)).save(path, quality=90)
    return folder


# ---------------------------------------------------------------------------------------------- jobs


def job_spec(
    name: str,
    architecture: str,
    *,
    data: str,
    epochs: int,
    batch_size: int,
    image_size: int,
    precision: str = "auto",
    device: str = "auto",
    weights: str = "none",
    until_layer: str | None = None,
    feature_cache: bool = True,
    compile_model: bool = False,
    augmentation: str = "none",
) -> Any:
    """A JobSpec as a user would send it: W&B and TensorBoard off (absent on the GPU machine), no serving."""
    from service.spec import JobSpec

    return JobSpec.model_validate(
        {
            "name": name,
            "model": {"architecture": architecture, "weights": weights},
            "data": {"path": data, "val_fraction": 0.2},
            "freeze": {"until_layer": until_layer} if until_layer else {},
            "training": {
                "epochs": epochs,
                "batch_size": batch_size,
                "image_size": image_size,
                "lr": 0.01,
                "optimizer": "sgd",
                "augmentation": augmentation,
                "scheduler": "cosine",
                "precision": precision,
                "device": device,
                "feature_cache": feature_cache,
                "compile": compile_model,
                "seed": 0,
            },
            "early_stopping": {"enabled": False},
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
            "serving": {"enabled": False},
        }
    )


def settings_for(root: Path, **overrides: Any) -> Any:
    """The service's settings for jobs under `root` (data in root/data), TorchServe off."""
    from service.settings import Settings

    fields = {"state_dir": root / "state", "data_root": root / "data", "torch_home": root / "torch"}
    return Settings(**{**fields, "torchserve_enabled": False, **overrides})


def run_job(spec: Any, root: Path, job_name: str) -> tuple[Any, Any, float]:
    """Run a job in-process as its worker does (service.training.runner.train): (outcome, reporter, s)."""
    from service.training.reporting import CollectingReporter
    from service.training.runner import train

    reporter = CollectingReporter()
    started = time.monotonic()
    outcome = train(spec, root / "jobs" / job_name, settings_for(root), reporter)
    return outcome, reporter, time.monotonic() - started


def cuda_or_none() -> torch.device | None:
    return torch.device("cuda") if torch.cuda.is_available() else None
