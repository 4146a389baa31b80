"""The serving side's domain types: archives, served models, predictions, the gate's images.

The serving backend (service.packaging.backend) speaks in these; the gRPC layer translates them. No
grpc and no package import here: it sits below the packages, so `api`, `jobs` and `packaging` all use
it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Archive:
    """A packaged model version in the model store: `<name>-v<version>.mar` and its SHA-256."""

    path: Path
    sha256: str
    name: str
    version: str


@dataclass(frozen=True)
class ServedModel:
    """A model the backend serves (mirrors tuneserve.v1.ServedModel)."""

    name: str
    version: str
    is_default: bool = False
    job_id: str = ""
    archive_sha256: str = ""
    ready: bool = False
    versions: tuple[str, ...] = ()
    inference_url: str = ""


@dataclass(frozen=True)
class ClassScore:
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The top classes for one image, or why that image alone failed."""

    scores: tuple[ClassScore, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class PredictResult:
    model: str
    version: str
    predictions: tuple[Prediction, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class GateImage:
    name: str  # what a refusal calls it: the path relative to the data root, or "synthetic image 1"
    data: bytes


@dataclass(frozen=True)
class GateImages:
    """The images the promotion gate compares a new version on, and where they came from."""

    images: tuple[GateImage, ...]
    source: str  # "validation images", "synthetic images", "given images"
    warning: str = ""  # why the job's own validation images were not (all) used

    def describe(self) -> str:
        return f"{len(self.images)} {self.source}"
