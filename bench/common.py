"""What the benchmarks share: timing, percentiles, tiny image folders, free ports, JSON out.

Imports only torch, numpy and PIL at module level, so the training benchmarks run where pydantic is
missing as far as they can (see bench/gpu.sh).
"""

from __future__ import annotations

import json
import math
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40))


def emit(result: dict[str, Any]) -> None:
    """One benchmark's result as one JSON line on stdout (the only thing benchmarks print)."""
    sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
    sys.stdout.flush()


def timed(work: Callable[[], object]) -> float:
    """Seconds `work` takes, with CUDA work finished on both sides of the clock."""
    sync()
    started = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - started


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks; NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def make_image_folder(folder: Path, classes: int = 3, per_class: int = 8, size: int = 40) -> Path:
    """folder/class_<i>/<j>.png: noisy pictures of one dominant colour per class (learnable)."""
    for c in range(classes):
        for j in range(per_class):
            rng = np.random.default_rng(c * 1000 + j)
            colour = np.array(COLOURS[c % len(COLOURS)])
            pixels = np.clip(rng.normal(0, 25, (size, size, 3)) + colour, 0, 255).astype(np.uint8)
            path = folder / f"class_{c}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return folder


def png_bytes(seed: int, size: int = 64) -> bytes:
    """A small picture to send to a served model."""
    import io

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Torch on `count` threads (None: as it is); the shared CPUs here run far slower oversubscribed."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"
