"""What the API needs from the serving side (implemented in service.packaging), in domain terms.

The servicer delegates Predict and the serving-control RPCs to an object of this shape; the scheduler
calls `deploy` when a job's archive is ready. No grpc here: the servicer translates. It sits below the
packages (it imports none of them), so service.packaging implements it without depending on service.api.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.records import Job


@dataclass(frozen=True)
class ServedModel:
    """A model TorchServe serves (mirrors tuneserve.v1.ServedModel)."""

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


class Serving(Protocol):
    """The serving side. Methods raise service.errors domain errors (NotFound, FailedPrecondition...)."""

    def deploy(self, job: Job) -> None:
        """Register a PACKAGING job's archive (job.result.archive_path) and record it (SERVED event)."""

    def predict(
        self, model: str, version: str | None, images: Sequence[bytes], top_k: int | None
    ) -> PredictResult: ...

    def serve_job(self, job_id: str) -> ServedModel: ...

    def unserve(self, name: str, version: str | None) -> None: ...

    def set_default(self, name: str, version: str) -> ServedModel: ...

    def list_served(self) -> list[ServedModel]: ...
