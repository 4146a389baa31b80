"""TorchServe as the serving backend (service.packaging.backend.ServingBackend).

It composes the model store (packaging and the version rule), the supervisor (TorchServe's process,
watchdog and availability), the version manager (deploy behind the gate, default, unserve), TorchServe's
gRPC inference client (predict), and the job store, where a deploy is recorded on its job.

The served registry may be shared with other control-plane replicas (each with its own TorchServe):
a thread follows it every settings.served_sync_s (VersionManager.sync).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.packaging.backend import AvailabilityListener
from service.packaging.export import check_request, export_job
from service.packaging.gate_images import given_images, images_for_job
from service.packaging.management import ManagementClient, RestClient
from service.packaging.model_store import ModelStore
from service.packaging.served_registry import ServedRegistry
from service.packaging.supervisor import TorchServeSupervisor
from service.packaging.torchserve_process import TorchServeProcess
from service.packaging.ts_config import grpc_inference_target, inference_url, management_url
from service.packaging.ts_grpc import TorchServeGrpc
from service.packaging.versions import READY_TIMEOUT_S, VersionManager
from service.records import EventKind, Job, JobResult, JobState
from service.serving_types import (
    Archive,
    ClassScore,
    Exported,
    ExportRequest,
    GateImage,
    GateImages,
    Prediction,
    PredictResult,
    ServedModel,
)
from service.settings import Settings
from service.spec import ServingSpec

log = logging.getLogger(__name__)


class JobSource(Protocol):
    """What serving needs from the job store (service.jobs.store.JobStore)."""

    def get_job(self, job_id: str) -> Job: ...

    def update_result(self, job_id: str, **fields: Any) -> JobResult: ...

    def append_event(
        self, job_id: str, kind: EventKind, message: str, data: dict[str, Any] | None = None
    ) -> Any: ...


class TorchServeBackend:
    """Packages into the model store and serves with one TorchServe child process."""

    def __init__(
        self, settings: Settings, store: JobSource | None = None, *, worker_threads: int | None = None
    ) -> None:
        self.settings = settings
        self.records = JobRecorder(store)
        self.model_store = ModelStore(settings)
        self.process = TorchServeProcess(settings, worker_threads=worker_threads)
        self.supervisor = TorchServeSupervisor(self.process, enabled=settings.torchserve_enabled)
        keys, renew = self.process.keys, self.process.renew_keys
        self.management = ManagementClient(RestClient(management_url(settings), "management", keys, renew))
        gate_client = RestClient(inference_url(settings), "inference", keys, renew, timeout_s=60)
        registry = ServedRegistry(settings.served_registry_file)
        self.versions = VersionManager(
            self.model_store, registry, self.management, gate_client, self.supervisor, self.records,
            inference_url(settings),
        )  # fmt: skip
        self._grpc: TorchServeGrpc | None = None
        self._stop_following = threading.Event()
        self._follower: threading.Thread | None = None

    @staticmethod
    def packager(settings: Settings) -> ModelStore:
        """What the worker packages with: no TorchServe and no job store needed."""
        return ModelStore(settings)

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start TorchServe, register every served version again, and watch the process."""
        if not self.settings.torchserve_enabled:
            log.info("TorchServe is disabled (TUNESERVE_TORCHSERVE_ENABLED=false); serving is off")
            return
        self.supervisor.start(restore=self.versions.restore)
        self._grpc = TorchServeGrpc(
            grpc_inference_target(self.settings), self.process.keys, self.process.renew_keys,
            self.settings.max_message_bytes,
        )  # fmt: skip
        self._stop_following.clear()
        self._follower = threading.Thread(target=self._follow, name="served-follow", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        self._stop_following.set()
        if self._follower is not None:  # a sync loading a version finishes it first (bounded)
            self._follower.join(timeout=READY_TIMEOUT_S)
            self._follower = None
        self.supervisor.stop()  # first: from here on, predict answers Unavailable
        if self._grpc is not None:
            self._grpc.close()
            self._grpc = None

    def health(self) -> dict[str, bool]:
        """Readiness by name: `torchserve` (answers /ping) and `torchserve/<model>` (a ready worker)."""
        alive = self.supervisor.alive()
        status = {"torchserve": alive}
        for entry in self.versions.registry.entries():
            # the registry's default: a replica that has not loaded another's promotion yet is not ready
            status[f"torchserve/{entry.name}"] = alive and self.versions.ready(entry.name, entry.default)
        return status

    def on_availability(self, listener: AvailabilityListener) -> None:
        self.supervisor.on_availability(listener)

    # ------------------------------------------------------------------------------ package, deploy

    def package(self, checkpoint: Path, model_name: str) -> Archive:
        return self.model_store.package(checkpoint, model_name)

    def deploy(
        self,
        archive: Archive,
        gate_images: GateImages | Sequence[bytes | GateImage] = (),
        *,
        job_id: str,
        checkpoint: Path,
        serving: ServingSpec,
    ) -> ServedModel:
        """Register, gate (synthetic images when none are given) and promote; record it on the job."""
        images = gate_images if isinstance(gate_images, GateImages) else given_images(gate_images)
        return self.versions.deploy(archive, images, job_id=job_id, checkpoint=checkpoint, serving=serving)

    def deploy_job(self, job: Job) -> None:
        self._deploy_job(job)

    def _deploy_job(self, job: Job) -> ServedModel:
        result = job.result
        if not result.archive_path or not result.archive_sha256 or not result.best_checkpoint:
            raise FailedPrecondition(f"job {job.id} has no archive to serve (packaging did not produce one)")
        archive = self.model_store.verified(Path(result.archive_path), result.archive_sha256)
        images = images_for_job(job, self.settings)
        if images.warning:
            log.warning("job %s: %s", job.id, images.warning)
            self.records.event(job.id, EventKind.WARNING, images.warning, {"gate_images": images.describe()})
        return self.deploy(
            archive, images, job_id=job.id, checkpoint=Path(result.best_checkpoint), serving=job.spec.serving
        )

    def serve_job(self, job_id: str) -> ServedModel:
        job = self.records.job(job_id)
        result = job.result
        if job.state != JobState.SUCCEEDED or not result.archive_path or not result.archive_sha256:
            raise FailedPrecondition(
                f"job {job_id} is {job.state} with {'an' if result.archive_path else 'no'} archive; only a "
                "SUCCEEDED job with an archive can be served"
            )
        if not result.best_checkpoint:
            raise FailedPrecondition(f"job {job_id} has no best checkpoint to gate its archive against")
        return self._deploy_job(job)

    def export(self, request: ExportRequest) -> Exported:
        check_request(request)  # a bad request is refused before the job is looked up
        return export_job(self.records.job(request.job_id), request, self.model_store)

    # --------------------------------------------------------------------------- versions, predict

    def set_default(self, name: str, version: str) -> ServedModel:
        return self.versions.set_default(name, version)

    def unserve(self, name: str, version: str | None = None) -> None:
        self.versions.unserve(name, version)

    def list_served(self) -> list[ServedModel]:
        return self.versions.list_served()

    def predict(
        self, model: str, version: str | None, images: Sequence[bytes], top_k: int | None
    ) -> PredictResult:
        """Top-k classes per image from TorchServe (gRPC); a bad image fails alone."""
        if not images:
            raise InvalidArgument("no images: send at least one JPEG or PNG in `images`")
        if top_k is not None and top_k < 0:
            raise InvalidArgument(f"top_k {top_k} is negative; give 0 for the model's default, or 1 or more")
        entry = self.versions.entry(model, version or None)
        served = entry.versions[version or entry.default]
        self.supervisor.require_running()
        if not self.versions.held.holds(model, version or None):
            raise Unavailable(
                f"model {model}{f' version {version}' if version else ''} is served but not loaded in this "
                "replica's TorchServe yet (another replica promoted it, or it failed to load: see the "
                f"service's log); retry in {self.settings.served_sync_s:g} s or so"
            )
        if self._grpc is None:
            raise Unavailable("serving is starting; retry in a few seconds")
        answers = self._grpc.predict(model, version or None, images, top_k or served.top_k)
        return PredictResult(model, version or "", tuple(_prediction(answer) for answer in answers))

    def _follow(self) -> None:
        while not self._stop_following.wait(self.settings.served_sync_s):
            try:
                self.versions.sync(stopping=self._stop_following.is_set)
            except Exception:  # e.g. the shared volume is briefly unreadable: keep serving what we have
                log.exception("could not follow the served registry %s", self.versions.registry.path)


class JobRecorder:
    """A deploy's records on its job, when there is a job store and the job is in it (deploy() takes
    any id: tests and the bench deploy archives of no job)."""

    def __init__(self, store: JobSource | None) -> None:
        self.store = store

    def job(self, job_id: str) -> Job:
        if self.store is None:
            raise FailedPrecondition("this backend has no job store; use deploy() with the archive")
        return self.store.get_job(job_id)

    def event(self, job_id: str, kind: EventKind, message: str, data: dict[str, Any]) -> None:
        if self.store is None:
            return
        try:
            self.store.append_event(job_id, kind, message, data)
        except NotFound:
            log.info("job %s is not in the store; not recorded: %s", job_id, message)

    def served(self, job_id: str, model: ServedModel) -> None:
        if self.store is None:
            return
        try:
            self.store.update_result(job_id, served_model=model.name, served_version=model.version)
        except NotFound:
            log.warning(
                "job %s is gone; served %s version %s without recording it", job_id, model.name, model.version
            )
            return
        self.event(
            job_id, EventKind.SERVED, f"serving {model.name} version {model.version} (default)",
            {"model": model.name, "version": model.version, "inference_url": model.inference_url},
        )  # fmt: skip


def _prediction(answer: Any) -> Prediction:
    if isinstance(answer, dict):
        return Prediction(error=str(answer.get("error", "TorchServe returned no scores")))
    return Prediction(scores=tuple(ClassScore(str(s["label"]), float(s["probability"])) for s in answer))
