"""Which images the promotion gate compares on: the job's recorded validation sample, read back from
the data root.

A job records its sample (service.training.gate_sample) when it starts training. A job from before
samples were recorded gets the same sample recomputed from its spec, while its data is still under the
data root. When the images are gone, the gate does not quietly fall back: it uses deterministic
synthetic images, which still catch an archive that does not match its checkpoint, and says so in a
warning (the job's events and the log). Refusing instead would make a job's intact archive unservable
for ever once its dataset is cleaned up.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from service.errors import DatasetError
from service.records import Job
from service.serving_types import GateImage, GateImages
from service.settings import Settings
from service.training.gate_sample import gate_sample_for

SYNTHETIC_COUNT = 4
MULTIPART_OVERHEAD = 4096  # the form fields around an image in the gate's request to TorchServe


def images_for_job(job: Job, settings: Settings) -> GateImages:
    """The job's validation sample as images; synthetic ones, with a warning, when they are gone."""
    sample = job.result.gate_sample
    source = "validation images"
    if not sample:
        try:
            sample = gate_sample_for(job.spec, settings.data_root, settings.max_image_pixels)
        except DatasetError as exc:
            return synthetic(
                f"job {job.id} recorded no gate sample (it predates them) and its data can no longer be "
                f"read ({exc.message}); gated on {SYNTHETIC_COUNT} synthetic images instead, which catch "
                "a broken archive but not a change only real images show"
            )
        source = "validation images (recomputed from the spec: the job recorded no sample)"
    # TorchServe refuses a request over its max_request_size (settings.max_message_bytes), so would a client
    images, missing = read_sample(sample, settings.data_root, settings.max_message_bytes - MULTIPART_OVERHEAD)
    if not images:
        return synthetic(
            f"the {len(sample)} validation images job {job.id} recorded for the gate are gone from the "
            f"data root or too large to send (e.g. {missing[0]!r}); gated on {SYNTHETIC_COUNT} synthetic "
            "images instead, which catch a broken archive but not a change only real images show"
        )
    warning = ""
    if missing:
        warning = (
            f"{len(missing)} of the {len(sample)} validation images job {job.id} recorded for the gate are "
            f"gone from the data root or too large to send (e.g. {missing[0]!r}); gated on the other "
            f"{len(images)}"
        )
    return GateImages(tuple(images), source, warning)


def given_images(images: Sequence[bytes | GateImage]) -> GateImages:
    """Images a caller hands to deploy() directly; synthetic ones when it hands none."""
    if not images:
        return GateImages(synthetic_images(), "synthetic images")
    named = [i if isinstance(i, GateImage) else GateImage(f"image {n}", i) for n, i in enumerate(images)]
    return GateImages(tuple(named), "given images")


def read_sample(
    sample: Sequence[str], data_root: Path, max_bytes: int | None = None
) -> tuple[list[GateImage], list[str]]:
    """(the images read, the paths left out: gone or over `max_bytes`); only files inside the data root
    are read."""
    root = data_root.resolve()
    images: list[GateImage] = []
    missing: list[str] = []
    for relative in sample:
        try:
            path = (root / relative).resolve()
            if not path.is_relative_to(root) or not path.is_file():  # a symlink out counts as gone
                missing.append(relative)
                continue
            if max_bytes is not None and path.stat().st_size > max_bytes:
                missing.append(relative)
                continue
            images.append(GateImage(relative, path.read_bytes()))
        except (OSError, ValueError):  # unreadable, or a name the OS cannot look up
            missing.append(relative)
    return images, missing


def synthetic(warning: str) -> GateImages:
    return GateImages(synthetic_images(), "synthetic images", warning)


def synthetic_images(count: int = SYNTHETIC_COUNT, size: int = 96) -> tuple[GateImage, ...]:
    """Deterministic colour ramps with noise, for when no validation image is at hand."""
    rng = np.random.default_rng(20240601)
    images = []
    for n in range(count):
        ramp = np.linspace(0.0, 1.0, size)[None, :, None] * rng.uniform(-255, 255, size=3)
        pixels = np.clip(rng.uniform(0, 255, size=3) + ramp + rng.normal(0, 25, (size, size, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        images.append(GateImage(f"synthetic image {n + 1}", buffer.getvalue()))
    return tuple(images)
