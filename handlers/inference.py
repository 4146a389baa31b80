"""What a served model does to a batch of requests: decode -> validation transforms -> forward -> labels.

The TorchServe handler (handlers/tuneserve_handler.py) and the promotion gate (in the service process)
both run this code, so "the archive predicts what the checkpoint predicts" compares like with like.
No TorchServe import here: TorchServe loads a handler module that must hold exactly one class.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms.v2 import functional as F

from service.tasks import TaskStrategy, task_for
from service.training.architecture import Preprocessing, build_for_inference, interpolation_mode
from service.training.transforms import make_transforms

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
LABELS_FILE = "index_to_name.json"
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # settings.max_image_pixels; the archive records the service's value
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# One answer per request: the top classes, or an error for that request alone.
Scores = list[dict[str, Any]]  # [{"label": str, "probability": float}, ...]
Answer = Scores | dict[str, str]  # or {"error": "..."}


class RequestError(ValueError):
    """A request that cannot be answered (bad bytes, empty body, too large); fails that request only."""


@dataclass(frozen=True)
class ServingConfig:
    """The archive's model_config.json, normalised: the architecture config plus how to read its outputs."""

    model_config: dict[str, Any]  # given to service.training.architecture.build_for_inference as is
    task: str  # multiclass | binary | multilabel
    class_names: tuple[str, ...]
    threshold: float
    top_k: int
    preprocessing: Preprocessing
    max_image_pixels: int

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], class_names: Sequence[str] | None = None) -> ServingConfig:
        """Read the flat keys a checkpoint's model_config carries (see service.training.checkpoints)."""
        try:
            names = tuple(class_names if class_names is not None else config["class_names"])
            return cls(
                model_config=dict(config),
                task=task_for(str(config["task"])).name,
                class_names=names,
                threshold=float(config["threshold"]),
                top_k=int(config["top_k"]),
                preprocessing=Preprocessing.from_model_config(config),
                max_image_pixels=int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
            )
        except KeyError as exc:
            raise ValueError(f"model_config lacks {exc.args[0]!r}; re-package the checkpoint") from None

    @property
    def strategy(self) -> TaskStrategy:
        return task_for(self.task)

    @property
    def output_units(self) -> int:
        return self.strategy.output_units(len(self.class_names))


def read_model_dir(model_dir: Path) -> tuple[ServingConfig, dict[str, torch.Tensor]]:
    """The config, labels and state_dict an archive unpacks to."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    labels = json.loads((model_dir / LABELS_FILE).read_text())
    names = [labels[str(i)] for i in range(len(labels))]
    state = torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    return ServingConfig.from_dict(config, names), state


def build_network(config: ServingConfig, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the architecture with its fine-tuned head and load the weights (strict), in eval mode."""
    model = build_for_inference({**config.model_config, "num_classes": config.output_units})
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def eval_transform(config: ServingConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Validation's transforms (service.training.transforms): resize the short side of the RGB picture,
    then the eval transform (center crop, to float, normalise)."""
    pre = config.preprocessing
    interpolation = interpolation_mode(pre.interpolation)
    _, evaluate = make_transforms(pre, "none")

    def transform(image: Image.Image) -> torch.Tensor:
        resized = F.resize(image, [pre.resize_size], interpolation=interpolation, antialias=True)
        return evaluate(F.pil_to_tensor(resized))

    return transform


def request_bytes(request: Any) -> bytes:
    """The image bytes of one request: raw bytes, a base64 string, or a dict with `data` or `body`."""
    if isinstance(request, Mapping):
        for key in ("data", "body"):
            if request.get(key) is not None:
                return request_bytes(request[key])
        raise RequestError("empty request: send the JPEG/PNG bytes as the body (or {'data': <base64>})")
    if isinstance(request, bytes | bytearray):
        return bytes(request)
    if isinstance(request, str):
        try:
            return base64.b64decode(request, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                "the request is text but not base64: send raw JPEG/PNG bytes or base64"
            ) from None
    raise RequestError(f"unsupported request body of type {type(request).__name__}; send JPEG/PNG bytes")


def requested_top_k(request: Any) -> int | None:
    """An optional per-request `top_k`: a multipart form field over REST, an input field over gRPC."""
    value = request.get("top_k") if isinstance(request, Mapping) else None
    if value is None:
        return None
    try:
        top_k = int(value.decode() if isinstance(value, bytes | bytearray) else value)
    except ValueError:
        raise RequestError(f"top_k must be a positive integer (got {value!r})") from None
    if top_k < 1:
        raise RequestError(f"top_k must be a positive integer (got {top_k})")
    return top_k


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to RGB, refusing anything over `max_pixels` before the pixels are read (bombs)."""
    if not data:
        raise RequestError("empty request: the body has no image bytes; send a JPEG or PNG")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                "(TUNESERVE_MAX_IMAGE_PIXELS): send a smaller image"
            )
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise RequestError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise RequestError(
            f"cannot decode the image: {len(data)} bytes that are not a JPEG, PNG, WebP, BMP or GIF file"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data behind a valid header
        if isinstance(exc, RequestError):
            raise
        raise RequestError(
            f"cannot decode the image ({exc}); send a whole JPEG, PNG, WebP, BMP or GIF file"
        ) from None


class ImageClassifier:
    """A fine-tuned model with its preprocessing and output rule; answers a batch of raw requests."""

    def __init__(self, model: nn.Module, config: ServingConfig, device: torch.device | None = None) -> None:
        self.config = config
        self.device = device or torch.device("cpu")
        # bf16 autocast and channels_last pay off on a GPU; CPU stays fp32 so the gate compares exactly.
        self.use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.channels_last = self.device.type == "cuda" and any(
            isinstance(m, nn.Conv2d) for m in model.modules()
        )
        model = model.to(self.device)
        self.model = (model.to(memory_format=torch.channels_last) if self.channels_last else model).eval()
        self.transform = eval_transform(config)

    @classmethod
    def from_model_dir(cls, model_dir: Path, device: torch.device | None = None) -> ImageClassifier:
        config, state = read_model_dir(model_dir)
        return cls(build_network(config, state), config, device)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Mapping[str, Any], device: torch.device | None = None
    ) -> ImageClassifier:
        """From a loaded checkpoint dict (service.training.checkpoints), without going through an archive."""
        config = ServingConfig.from_dict(checkpoint["model_config"], checkpoint["class_names"])
        return cls(build_network(config, checkpoint["model"]), config, device)

    def handle(self, requests: Sequence[Any]) -> list[Answer]:
        """One answer per request, in order; a bad request gets {"error": ...} and the rest still run."""
        answers: list[Answer] = [{"error": "internal: no answer"}] * len(requests)
        ready: list[tuple[int, torch.Tensor, int]] = []  # (position, image tensor, top_k)
        for i, request in enumerate(requests):
            try:
                image = decode_image(request_bytes(request), self.config.max_image_pixels)
                ready.append((i, self.transform(image), requested_top_k(request) or self.config.top_k))
            except RequestError as exc:
                answers[i] = {"error": str(exc)}
        if ready:
            probabilities = self.probabilities(torch.stack([tensor for _, tensor, _ in ready]))
            for (i, _, top_k), probs in zip(ready, probabilities, strict=True):
                answers[i] = self.label(probs, top_k)
        return answers

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (the task's: softmax or sigmoid), float32 on the CPU."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = batch.to(self.device, memory_format=memory_format, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.model(batch)
        return self.config.strategy.probabilities(logits).cpu()

    def label(self, probs: torch.Tensor, top_k: int) -> Scores:
        """Turn one image's probabilities into [{"label", "probability"}], most likely first.

        multiclass: the top_k classes. binary: both classes, the decision by threshold first (the
        positive class is class_names[1]). multilabel: every label over the threshold.
        """
        config = self.config
        pairs = config.strategy.label(probs, config.class_names, config.threshold, top_k)
        return [_score(label, p) for label, p in pairs]


def _score(label: str, probability: float) -> dict[str, Any]:
    return {"label": label, "probability": probability}
