"""The promotion gate: a version becomes the default only if TorchServe answers like the checkpoint.

A few validation images go through TorchServe's REST API (the version-specific URL) and through the
same handler code in-process, built straight from the checkpoint. Same top-1 and probabilities within
the tolerance (1e-4 on CPU fp32), or the version is not promoted and the reason says where it differed.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlers.inference import Answer, ImageClassifier
from service.errors import FailedPrecondition, InvalidArgument
from service.packaging.management import RestClient
from service.training.checkpoints import load_checkpoint

log = logging.getLogger(__name__)

CPU_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2  # TorchServe on a GPU runs bf16 autocast; the reference runs fp32 on the CPU


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    images: int
    max_difference: float  # largest |probability difference| over the labels both sides returned


class GateFailed(FailedPrecondition):
    """A version that answers differently from its checkpoint; it is not promoted."""

    def __init__(self, message: str, result: GateResult) -> None:
        super().__init__(message)
        self.result = result


def check_version(
    rest: RestClient,
    model_name: str,
    version: str,
    checkpoint: Path,
    images: Sequence[bytes],
    tolerance: float = CPU_TOLERANCE,
) -> GateResult:
    """Compare TorchServe's answers for `version` with the checkpoint's own, on `images`."""
    reference = ImageClassifier.from_checkpoint(load_checkpoint(checkpoint))
    top_k = len(reference.config.class_names)  # compare whole distributions, not a top-k cut
    expected = [reference.handle([{"data": image, "top_k": top_k}])[0] for image in images]
    path = f"/predictions/{urllib.parse.quote(model_name, safe='')}/{urllib.parse.quote(version, safe='')}"
    got = [_predict_rest(rest, path, image, top_k) for image in images]
    result = compare(expected, got, tolerance)
    log.info("gate for %s version %s: %s", model_name, version, result)
    return result


def compare(expected: Sequence[Answer], got: Sequence[Answer], tolerance: float) -> GateResult:
    """Same top-1 label per image, and every label's probability within tolerance."""
    worst = 0.0
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if isinstance(want, dict) or isinstance(have, dict):
            if isinstance(want, dict) and isinstance(have, dict):
                continue  # both refused the image (e.g. undecodable): they agree
            reason = f"image {i}: expected {_brief(want)}, TorchServe answered {_brief(have)}"
            return GateResult(False, reason, len(expected), worst)
        if not want or not have or want[0]["label"] != have[0]["label"]:
            reason = f"image {i}: top-1 is {_top1(have)} in TorchServe but {_top1(want)} in the checkpoint"
            return GateResult(False, reason, len(expected), worst)
        have_by_label = {s["label"]: float(s["probability"]) for s in have}
        for score in want:
            label, p = score["label"], float(score["probability"])
            if label not in have_by_label:
                reason = f"image {i}: label {label!r} (p={p:.6f}) is missing from TorchServe's answer"
                return GateResult(False, reason, len(expected), worst)
            difference = abs(have_by_label[label] - p)
            worst = max(worst, difference)
            if difference > tolerance:
                reason = (
                    f"image {i}: P({label}) is {have_by_label[label]:.6f} in TorchServe but {p:.6f} in the "
                    f"checkpoint (difference {difference:.2e} > {tolerance:.0e})"
                )
                return GateResult(False, reason, len(expected), worst)
    return GateResult(
        True, f"{len(expected)} images agree (max difference {worst:.2e})", len(expected), worst
    )


def synthetic_images(count: int = 4, size: int = 96) -> list[bytes]:
    """Deterministic pictures for when no validation images are at hand (re-serving an old job)."""
    rng = np.random.default_rng(20240601)
    images = []
    for _ in range(count):
        ramp = np.linspace(0.0, 1.0, size)[None, :, None] * rng.uniform(-255, 255, size=3)
        pixels = np.clip(rng.uniform(0, 255, size=3) + ramp + rng.normal(0, 25, (size, size, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def _predict_rest(rest: RestClient, path: str, image: bytes, top_k: int) -> Answer:
    # TorchServe hands a handler the form fields of a multipart body (query parameters are dropped)
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="image"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            image,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    try:
        answer: Any = rest.call(
            "POST", path, body=body, content_type=f"multipart/form-data; boundary={boundary}"
        )
    except InvalidArgument as exc:  # HTTP 400: the handler refused this image
        return {"error": exc.message}
    return answer if isinstance(answer, list | dict) else {"error": json.dumps(answer)[:200]}


def _brief(answer: Answer) -> str:
    return f"error {answer['error']!r}" if isinstance(answer, dict) else f"top-1 {_top1(answer)}"


def _top1(answer: Answer) -> str:
    if isinstance(answer, dict) or not answer:
        return "nothing"
    return f"{answer[0]['label']!r} (p={float(answer[0]['probability']):.6f})"
