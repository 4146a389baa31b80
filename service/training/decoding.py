"""Decode a dataset's images once: RGB, short side resized, uint8, the form kept in memory.

PIL decodes in a thread pool (it releases the GIL); with a CUDA device, JPEGs are decoded in chunks by
nvJPEG (torchvision.io.decode_jpeg) and resized there, which is many times faster than a few CPU cores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as F

from service.training.architecture import Preprocessing, interpolation_mode
from service.training.scan import SKIP_UNDECODABLE, Sample, Skipped

log = logging.getLogger(__name__)

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
DECODE_CHUNK = 64  # JPEGs per batched device decode: enough to fill the decoder, little memory


def decode_image(
    path: os.PathLike[str] | str, resize_size: int, interpolation: str, max_image_pixels: int | None
) -> Tensor:
    """uint8 RGB tensor (3, H, W) with the short side resized to `resize_size`."""
    with Image.open(path) as image:
        if max_image_pixels is not None and image.width * image.height > max_image_pixels:
            raise ValueError(f"{image.width}x{image.height} is over {max_image_pixels} pixels")
        rgb = image.convert("RGB")  # the full decode happens here
    resized = F.resize(rgb, [resize_size], interpolation=interpolation_mode(interpolation), antialias=True)
    return F.pil_to_tensor(resized)


def estimate_bytes(samples: Sequence[Sample], resize_size: int) -> int:
    """Memory the decoded, resized uint8 images would take (sizes from the scan's header check)."""
    total = 0
    for sample in samples:
        width, height = sample.size
        scale = resize_size / max(1, min(width, height))
        total += 3 * max(1, round(width * scale)) * max(1, round(height * scale))
    return total


def decode_jpegs(
    samples: Sequence[Sample], preprocessing: Preprocessing, device: torch.device
) -> list[Tensor | None]:
    """JPEGs decoded and resized on `device` (nvJPEG on CUDA), back in host memory as uint8 like
    decode_image; None for every image of a chunk that fails (PIL then tries them one by one)."""
    interpolation = interpolation_mode(preprocessing.interpolation)
    decoded: list[Tensor | None] = []
    for start in range(0, len(samples), DECODE_CHUNK):
        chunk = samples[start : start + DECODE_CHUNK]
        try:
            data = [read_file(str(sample.path)) for sample in chunk]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, OSError) as exc:  # one corrupt file fails the whole chunk
            log.info("decoding %d JPEGs on %s failed (%s); decoding them with PIL", len(chunk), device, exc)
            decoded += [None] * len(chunk)
            continue
        for image in images:
            resized = F.resize(
                image, [preprocessing.resize_size], interpolation=interpolation, antialias=True
            )
            decoded.append(resized.cpu())
    return decoded


def preload(
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    max_image_pixels: int | None,
    decode_device: torch.device | None = None,
) -> tuple[tuple[Sample, ...], list[Tensor], list[Skipped]]:
    """Decode every sample once (threads: PIL releases the GIL), JPEGs on `decode_device` when given;
    failures are dropped and listed. The scan already refused images over `max_image_pixels`."""
    on_device: dict[int, Tensor] = {}
    if decode_device is not None:
        jpegs = [i for i, s in enumerate(samples) if s.path.suffix.lower() in JPEG_SUFFIXES]
        done = decode_jpegs([samples[i] for i in jpegs], preprocessing, decode_device)
        on_device = {i: image for i, image in zip(jpegs, done, strict=True) if image is not None}

    def load(index: int, sample: Sample) -> Tensor | None:
        if index in on_device:
            return on_device[index]
        try:
            return decode_image(
                sample.path, preprocessing.resize_size, preprocessing.interpolation, max_image_pixels
            )
        except Exception as exc:  # corrupt or truncated: counted as a skip, the job goes on
            log.warning("skipping %s: %s", sample.path, exc)
            return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(load, range(len(samples)), samples))
    kept = [(s, image) for s, image in zip(samples, decoded, strict=True) if image is not None]
    lost = [
        Skipped(s.path, SKIP_UNDECODABLE) for s, image in zip(samples, decoded, strict=True) if image is None
    ]
    return tuple(s for s, _ in kept), [image for _, image in kept], lost
