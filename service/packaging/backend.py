"""The serving backend seam: what the service asks of whatever packages and serves models.

The worker packages a finished job's best checkpoint (`Packager.package`); the scheduler deploys a
packaged job (`deploy_job`); the gRPC layer serves, rolls back, unserves, lists and predicts; the
health service follows `health` and `on_availability`. Everything is in domain types
(service.serving_types, service.records, service.spec) and raises service.errors: no grpc here, and
nothing about TorchServe. TorchServe is the one implementation today
(service.packaging.torchserve_backend.TorchServeBackend, chosen in service/app.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from service.records import Job
from service.serving_types import (
    Archive,
    Exported,
    ExportRequest,
    GateImage,
    GateImages,
    PredictResult,
    ServedModel,
)
from service.spec import ServingSpec

AvailabilityListener = Callable[[bool], None]


class Packager(Protocol):
    """Builds archives; needs neither a running server nor the job store (the worker process uses it)."""

    def package(self, checkpoint: Path, model_name: str) -> Archive:
        """The checkpoint as the model's next version (one more than the highest in the model store)."""
        ...


class ServingBackend(Packager, Protocol):
    """Serves packaged versions behind the promotion gate, one default version per model."""

    def start(self) -> None:
        """Start serving and serve again every version that was served before."""
        ...

    def stop(self) -> None: ...

    def deploy(
        self,
        archive: Archive,
        gate_images: GateImages | Sequence[bytes | GateImage] = (),
        *,
        job_id: str,
        checkpoint: Path,
        serving: ServingSpec,
    ) -> ServedModel:
        """Register `archive` as a new version, gate it against `checkpoint` on `gate_images`, make it
        the default and record it on the job. A refused version is removed and the default stays."""
        ...

    def deploy_job(self, job: Job) -> None:
        """deploy() a packaged job's archive, gated on the job's own validation images (the scheduler's
        call when a job is packaged; what is served is recorded on the job)."""
        ...

    def serve_job(self, job_id: str) -> ServedModel:
        """Serve a SUCCEEDED job's archive again (and make it the default version)."""
        ...

    def set_default(self, name: str, version: str) -> ServedModel: ...

    def unserve(self, name: str, version: str | None = None) -> None:
        """Stop serving one version, or (version None) the whole model; archives stay in the store."""
        ...

    def list_served(self) -> list[ServedModel]: ...

    def predict(
        self, model: str, version: str | None, images: Sequence[bytes], top_k: int | None
    ) -> PredictResult:
        """Top-k classes per image (the default version, and the model's own top_k, when None)."""
        ...

    def export(self, request: ExportRequest) -> Exported:
        """Write a SUCCEEDED job's archive (or another version of its model) as a folder that a plain
        TorchServe serves, optionally with KServe manifests; all or nothing."""
        ...

    def health(self) -> dict[str, bool]:
        """Readiness by name: the backend itself and each served model's default version."""
        ...

    def on_availability(self, listener: AvailabilityListener) -> None:
        """Call `listener(available)` now and whenever serving goes down or is back with its models."""
        ...
