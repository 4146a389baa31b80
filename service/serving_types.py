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


@dataclass(frozen=True)
class ExportRequest:
    """What to export (mirrors tuneserve.v1.ExportModelRequest; zero values already replaced by defaults)."""

    job_id: str
    target: Path  # a folder that does not exist yet, or is empty
    version: str = ""  # "": the version the job packaged
    kserve: bool = False  # also write an InferenceService and a ClusterServingRuntime
    storage_uri: str = ""  # where the folder will be for KServe: pvc://..., s3://..., gs://...
    token_auth: bool = True  # TorchServe's token authorization on inference
    # TorchServe's batching and workers for the model; None: what the job's serving spec says
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    workers: int | None = None
    min_replicas: int = 1
    max_replicas: int = 4
    image: str = "tuneserve:cpu"  # the image whose TorchServe the ClusterServingRuntime runs


@dataclass(frozen=True)
class Exported:
    """A written export: the folder, the model and version in it, and its files (relative paths)."""

    path: Path
    name: str
    version: str
    files: tuple[str, ...]
