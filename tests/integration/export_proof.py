"""What the export proof's fixtures (conftest.py) hand to test_export_serving.py and
test_export_readiness.py: a trained job with its gate images, the shared plain TorchServe and what the
readiness probe said while it started."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.plain_torchserve import PlainTorchServe

EXPORTED_MODEL = "digits"
EXPORTED_VERSION = "3"
DIGITS_PER_CLASS = 4  # 40 pictures: a validation split of one per digit, all of which the gate samples
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TrainedJob:
    """A finished job: its best checkpoint and the validation images the promotion gate compares on."""

    checkpoint: Path
    images: list[bytes]
    image_names: list[str]
    source: str
    warning: str


def write_digits(folder: Path, per_class: int, size: int = 64) -> None:
    """folder/<digit>/<i>.png: the first `per_class` of each digit, 0..16 ink upsampled to RGB PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits, written = load_digits(), dict.fromkeys(range(10), 0)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if written[int(label)] == per_class:
            continue
        written[int(label)] += 1
        grey = (pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{i:04d}.png")


@dataclass(frozen=True)
class ProbeSample:
    """One run of the KServe runtime's readiness probe (service.packaging.ts_ready) during the start."""

    at_s: float
    port_open: bool
    probe_rc: int
    probe_says: str


@dataclass(frozen=True)
class StartedServer:
    """The shared plain TorchServe, what the readiness probe said while it started, and the answer to
    the first prediction sent the moment the probe first said ready."""

    server: PlainTorchServe
    before_start: ProbeSample
    samples: list[ProbeSample]
    first_answer_status: int


def readiness_probe(server: PlainTorchServe) -> list[str]:
    """The probe as the kubelet's exec would run it in the container: the plain venv's Python, the file."""
    import service.packaging.ts_ready as ts_ready

    python = server.env["PATH"].split(":", 1)[0] + "/python"
    return [python, ts_ready.__file__, f"--ts-config={server.config}", f"--key-file={server.key_file}"]


def probe_once(server: PlainTorchServe, started: float, env: dict[str, str] | None = None) -> ProbeSample:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", server.ports["inference"]), timeout=1):
            opened = True
    except OSError:
        opened = False
    done = subprocess.run(
        readiness_probe(server), cwd=server.run, env=env or server.env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    return ProbeSample(
        time.monotonic() - started, opened, done.returncode, (done.stdout + done.stderr).strip()
    )
