"""Serving, as the gRPC layer sees it: package, deploy behind the gate, version, predict, health.

ServingManager owns the TorchServe child process, the management client, the gRPC inference client
and the served-model registry. A watchdog notices when TorchServe dies, restarts it and registers
every served version again from the registry. Meanwhile predictions are UNAVAILABLE and availability
listeners (the gRPC health service) hear `False`, then `True` once every version is registered again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.packaging.archiver import Archive, build_archive, read_manifest, sha256_of
from service.packaging.gate import BF16_TOLERANCE, CPU_TOLERANCE, GateFailed, GateImage, check_version
from service.packaging.gate_images import GateImages, given_images, images_for_job
from service.packaging.management import ManagementClient, RestClient
from service.packaging.served import ServedEntry, ServedRegistry, ServedVersion, version_key
from service.packaging.torchserve import TorchServeProcess
from service.packaging.ts_config import grpc_inference_target, inference_url, management_url
from service.packaging.ts_grpc import TorchServeGrpc
from service.records import EventKind, Job, JobResult, JobState
from service.serving_types import ClassScore, Prediction, ServedModel
from service.settings import Settings
from service.spec import ServingSpec

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
WATCH_INTERVAL_S = 2.0


class JobSource(Protocol):
    """What serving needs from the job store (service.jobs.store.JobStore)."""

    def get_job(self, job_id: str) -> Job: ...

    def update_result(self, job_id: str, **fields: Any) -> JobResult: ...

    def append_event(
        self, job_id: str, kind: EventKind, message: str, data: dict[str, Any] | None = None
    ) -> Any: ...


class ServingManager:
    """The one object the gRPC layer delegates serving to."""

    def __init__(
        self, settings: Settings, store: JobSource | None = None, *, worker_threads: int | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.process = TorchServeProcess(settings, worker_threads=worker_threads)
        keys, renew = self.process.keys, self.process.renew_keys
        self.management = ManagementClient(RestClient(management_url(settings), "management", keys, renew))
        self.rest_inference = RestClient(inference_url(settings), "inference", keys, renew, timeout_s=60)
        self.registry = ServedRegistry(settings.torchserve_dir / "served_models.json")
        self._grpc: TorchServeGrpc | None = None
        self._lock = threading.RLock()  # one registry-changing operation at a time
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._available = threading.Event()  # TorchServe is up and every served version is registered
        self._listeners: list[Callable[[bool], None]] = []
        self.restarts = 0

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start TorchServe, register every served version again, and watch the process."""
        if not self.settings.torchserve_enabled:
            log.info("TorchServe is disabled (TUNESERVE_TORCHSERVE_ENABLED=false); serving is off")
            return
        self._stopping.clear()
        with self._lock:
            self.process.start()
            self._restore()
        self._grpc = TorchServeGrpc(
            grpc_inference_target(self.settings), self.process.keys, self.process.renew_keys,
            self.settings.max_message_bytes,
        )  # fmt: skip
        self._set_available(True)
        self._watchdog = threading.Thread(target=self._watch, name="torchserve-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        self._set_available(False)
        if self._watchdog is not None:
            self._watchdog.join(timeout=30)
            self._watchdog = None
        if self._grpc is not None:
            self._grpc.close()
            self._grpc = None
        with self._lock:
            self.process.stop()

    def on_availability(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(available)` now and whenever TorchServe goes down or is back with its models."""
        self._listeners.append(listener)
        listener(self._available.is_set())

    # ----------------------------------------------------------------------------------- packaging

    def package(self, checkpoint: Path, model_name: str) -> Archive:
        """Build the checkpoint's archive as the model's next version, in the model store."""
        for _ in range(3):  # another packager may take the same version number first
            try:
                return build_archive(
                    checkpoint, self.settings.model_store, model_name, self.next_version(model_name),
                    max_image_pixels=self.settings.max_image_pixels,
                )  # fmt: skip
            except AlreadyExists:
                continue
        raise AlreadyExists(f"could not pick a free version for model {model_name}; retry")

    def next_version(self, model_name: str) -> str:
        """One more than any version served or archived under this name ("1" for a new model)."""
        entry = self.registry.get(model_name)
        taken = [version_key(v)[0] for v in (entry.versions if entry else {})]
        pattern = re.compile(rf"^{re.escape(model_name)}-v(\d+)(\.\d+)*\.mar$")
        for path in self.settings.model_store.glob(f"{model_name}-v*.mar"):
            match = pattern.match(path.name)
            if match:
                taken.append(int(match.group(1)))
        return str(max(taken, default=0) + 1)

    # ------------------------------------------------------------------------------------- serving

    def deploy(
        self,
        job_id: str,
        archive_path: Path,
        sha256: str,
        serving: ServingSpec,
        *,
        checkpoint: Path,
        gate_images: GateImages | Sequence[bytes | GateImage] = (),
    ) -> ServedModel:
        """Register the archive as a new version, wait until it is ready, gate it, make it the default.

        The gate compares on `gate_images` (deploy_job passes the job's validation sample; synthetic
        images when none are given). Older versions stay registered for rollback. A version that fails
        the gate is unregistered and GateFailed says why; the default does not change.
        """
        images = gate_images if isinstance(gate_images, GateImages) else given_images(gate_images)
        archive_path = self._check_archive(archive_path, sha256)
        name, version = read_manifest(archive_path)
        with self._lock:
            self._require_running()
            entry = self.registry.get(name)
            if entry is not None and version in entry.versions:
                if entry.versions[version].sha256 != sha256:
                    raise AlreadyExists(
                        f"model {name} already serves a different archive as version {version}"
                    )
                return self.set_default(name, version)  # already served and gated: serving again = promote
            self._register(name, archive_path.name, serving)
            try:
                self._gate(job_id, name, version, checkpoint, images)
            except BaseException:
                self._unregister_quietly(name, version)
                raise
            self.management.set_default(name, version)
            served = ServedVersion(
                version=version,
                job_id=job_id,
                archive=archive_path.name,
                sha256=sha256,
                checkpoint=str(checkpoint),
                batch_size=serving.batch_size,
                max_batch_delay_ms=serving.max_batch_delay_ms,
                workers=serving.workers,
                top_k=serving.top_k,
                served_at=time.time(),
            )
            model = self._describe(self.registry.add(name, served, make_default=True), version)
        self._record_served(job_id, model)
        return model

    def serve_job(self, job_id: str) -> ServedModel:
        """Serve a finished job's archive again (and make it the default version)."""
        if self.store is None:
            raise FailedPrecondition("this ServingManager has no job store; use deploy() with the archive")
        job = self.store.get_job(job_id)
        result = job.result
        if job.state != JobState.SUCCEEDED or not result.archive_path or not result.archive_sha256:
            raise FailedPrecondition(
                f"job {job_id} is {job.state} with {'an' if result.archive_path else 'no'} archive; only a "
                "SUCCEEDED job with an archive can be served"
            )
        if not result.best_checkpoint:
            raise FailedPrecondition(f"job {job_id} has no best checkpoint to gate its archive against")
        return self.deploy_job(job)

    def deploy_job(self, job: Job) -> ServedModel:
        """deploy() a packaged job's archive, gated on the job's own validation images."""
        result = job.result
        if not result.archive_path or not result.archive_sha256 or not result.best_checkpoint:
            raise FailedPrecondition(f"job {job.id} has no archive to serve (packaging did not produce one)")
        images = images_for_job(job, self.settings)
        if images.warning:
            log.warning("job %s: %s", job.id, images.warning)
            self._event(job.id, EventKind.WARNING, images.warning, {"gate_images": images.describe()})
        return self.deploy(
            job.id, Path(result.archive_path), result.archive_sha256, job.spec.serving,
            checkpoint=Path(result.best_checkpoint), gate_images=images,
        )  # fmt: skip

    def unserve(self, name: str, version: str | None = None) -> None:
        """Unregister one version (or every version, version None/""); the archives stay in the store."""
        with self._lock:
            entry = self._entry(name, version or None)
            if not version:
                doomed = [v for v in entry.ordered_versions() if v != entry.default] + [entry.default]
            else:
                doomed = [version]
                remaining = [v for v in entry.ordered_versions() if v != version]
                if version == entry.default and remaining:
                    self._set_default_quietly(name, max(remaining, key=version_key))
            for v in doomed:
                self._unregister_quietly(name, v)
                self.registry.remove(name, v)

    def set_default(self, name: str, version: str) -> ServedModel:
        """Make a served version the default (rollback is setting an older one)."""
        with self._lock:
            self._entry(name, version)
            self._require_running()
            self.management.set_default(name, version)
            return self._describe(self.registry.set_default(name, version), version)

    def list_served(self) -> list[ServedModel]:
        """Every served model, described by its default version."""
        return [self._describe(entry, entry.default) for entry in self.registry.entries()]

    def predict(self, model: str, version: str, images: Sequence[bytes], top_k: int = 0) -> list[Prediction]:
        """Top-k classes per image from TorchServe (gRPC); a bad image fails alone."""
        if not images:
            raise InvalidArgument("no images: send at least one JPEG or PNG in `images`")
        if top_k < 0:
            raise InvalidArgument(f"top_k {top_k} is negative; give 0 for the model's default, or 1 or more")
        entry = self._entry(model, version or None)
        served = entry.versions[version or entry.default]
        self._require_running()
        if self._grpc is None:
            raise Unavailable("serving is starting; retry in a few seconds")
        answers = self._grpc.predict(model, version or None, images, top_k or served.top_k)
        return [_prediction(answer) for answer in answers]

    def health(self) -> dict[str, bool]:
        """Readiness by name: `torchserve` (answers /ping) and `torchserve/<model>` (a ready worker)."""
        alive = self.process.is_running() and self.process.ping()
        status = {"torchserve": alive}
        for entry in self.registry.entries():
            status[f"torchserve/{entry.name}"] = alive and self._ready(entry.name, entry.default)
        return status

    # ------------------------------------------------------------------------------------ internals

    def _check_archive(self, archive_path: Path, sha256: str) -> Path:
        path = archive_path.resolve()
        if path.parent != self.settings.model_store.resolve():
            raise InvalidArgument(
                f"archive {archive_path} is not in the model store {self.settings.model_store}"
            )
        if not path.is_file():
            raise NotFound(f"archive {archive_path} does not exist; package the job again")
        actual = sha256_of(path)
        if actual != sha256:
            raise FailedPrecondition(
                f"archive {path.name} has SHA-256 {actual}, but {sha256} was recorded when it was packaged: "
                "it changed since; package the job again"
            )
        return path

    def _register(self, name: str, archive: str, serving: ServingSpec) -> None:
        _, version = read_manifest(self.settings.model_store / archive)
        try:
            self.management.register(
                archive, name, batch_size=serving.batch_size, max_batch_delay_ms=serving.max_batch_delay_ms,
                workers=serving.workers,
            )  # fmt: skip
        except AlreadyExists:  # left over from an interrupted deploy: start clean
            self._unregister_quietly(name, version)
            self.management.register(
                archive, name, batch_size=serving.batch_size, max_batch_delay_ms=serving.max_batch_delay_ms,
                workers=serving.workers,
            )  # fmt: skip
        self.management.wait_ready(name, version, READY_TIMEOUT_S)

    def _gate(self, job_id: str, name: str, version: str, checkpoint: Path, images: GateImages) -> None:
        tolerance = BF16_TOLERANCE if _cuda_available() else CPU_TOLERANCE
        started = time.monotonic()
        result = check_version(self.rest_inference, name, version, checkpoint, images.images, tolerance)
        data = {
            "model": name, "version": version, "passed": result.passed, "images": result.images,
            "source": images.source, "tolerance": tolerance, "max_difference": result.max_difference,
            "image": result.image, "seconds": round(time.monotonic() - started, 3),
        }  # fmt: skip
        if result.passed:
            message = (
                f"promotion gate: version {version} of {name} answers like its checkpoint on "
                f"{images.describe()} (max difference {result.max_difference:.2e}, tolerance {tolerance:g})"
            )
            log.info("job %s: %s", job_id, message)
            self._event(job_id, EventKind.INFO, message, data)
            return
        default = self.registry.get(name)
        message = (
            f"version {version} of model {name} was not promoted: on {images.describe()} it answers "
            f"differently from its checkpoint ({result.reason}); the default stays "
            f"{default.default if default else 'unset'}"
        )
        self._event(job_id, EventKind.WARNING, f"promotion gate: {message}", data)
        raise GateFailed(message, result)

    def _restore(self) -> None:
        """Register every version in the registry again (after a start or a restart)."""
        for entry in self.registry.entries():
            for version in entry.ordered_versions():
                served = entry.versions[version]
                spec = ServingSpec(
                    model_name=entry.name,
                    batch_size=served.batch_size, max_batch_delay_ms=served.max_batch_delay_ms,
                    workers=served.workers, top_k=served.top_k,
                )  # fmt: skip
                try:
                    self._check_archive(self.settings.model_store / served.archive, served.sha256)
                    self._register(entry.name, served.archive, spec)
                except Exception:
                    log.exception("could not serve %s version %s again", entry.name, version)
            self._set_default_quietly(entry.name, entry.default)

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.wait(WATCH_INTERVAL_S * (1 + min(failures, 15))):
            if self.process.is_running():
                failures = 0
                continue
            self._set_available(False)  # before the lock: predictions fail fast while we restart
            with self._lock:
                if self._stopping.is_set():
                    return
                log.error("TorchServe died; restarting it. Its last output: %s", self.process.log_tail())
                try:
                    self.process.restart()
                    self._restore()
                    self._set_available(True)  # before the count: whoever waits on it may predict at once
                    self.restarts += 1
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("TorchServe restart failed (%d in a row)", failures)

    def _entry(self, name: str, version: str | None) -> ServedEntry:
        entry = self.registry.get(name)
        if entry is None:
            served = ", ".join(e.name for e in self.registry.entries()) or "none"
            raise NotFound(f"model {name!r} is not served (served models: {served})")
        if version is not None and version not in entry.versions:
            raise NotFound(
                f"model {name} has no version {version!r} (versions: {', '.join(entry.ordered_versions())})"
            )
        return entry

    def _describe(self, entry: ServedEntry, version: str) -> ServedModel:
        served = entry.versions[version]
        return ServedModel(
            name=entry.name,
            version=version,
            is_default=version == entry.default,
            job_id=served.job_id,
            archive_sha256=served.sha256,
            ready=self._ready(entry.name, version),
            versions=tuple(entry.ordered_versions()),
            inference_url=f"{inference_url(self.settings)}/predictions/{entry.name}",
        )

    def _ready(self, name: str, version: str) -> bool:
        if not self.process.is_running():
            return False
        try:
            return any(info.ready for info in self.management.describe(name, version))
        except (NotFound, Unavailable):
            return False

    def _require_running(self) -> None:
        if not self.settings.torchserve_enabled:
            raise Unavailable("serving is off (TUNESERVE_TORCHSERVE_ENABLED=false)")
        if not self.process.is_running() or not self._available.is_set():
            raise Unavailable("TorchServe is not running (starting or restarting); retry in a few seconds")

    def _set_available(self, available: bool) -> None:
        if available == self._available.is_set():
            return
        if available:
            self._available.set()
        else:
            self._available.clear()
        log.info("serving is %s", "available" if available else "unavailable")
        for listener in self._listeners:
            try:
                listener(available)
            except Exception:  # a listener must not stop the watchdog
                log.exception("availability listener failed")

    def _unregister_quietly(self, name: str, version: str) -> None:
        try:
            self.management.unregister(name, version)
        except NotFound:
            pass
        except Exception:
            log.exception("could not unregister %s version %s", name, version)

    def _set_default_quietly(self, name: str, version: str) -> None:
        try:
            self.management.set_default(name, version)
        except Exception:
            log.exception("could not make version %s the default of %s", version, name)

    def _record_served(self, job_id: str, model: ServedModel) -> None:
        if self.store is None:
            return
        try:
            self.store.update_result(job_id, served_model=model.name, served_version=model.version)
        except NotFound:
            log.warning(
                "job %s is gone; served %s version %s without recording it", job_id, model.name, model.version
            )
            return
        self._event(
            job_id, EventKind.SERVED, f"serving {model.name} version {model.version} (default)",
            {"model": model.name, "version": model.version, "inference_url": model.inference_url},
        )  # fmt: skip

    def _event(self, job_id: str, kind: EventKind, message: str, data: dict[str, Any]) -> None:
        """An event on the job, when there is a job store and the job is in it (deploy() takes any id)."""
        if self.store is None:
            return
        try:
            self.store.append_event(job_id, kind, message, data)
        except NotFound:
            log.info("job %s is not in the store; not recorded: %s", job_id, message)


def _prediction(answer: Any) -> Prediction:
    if isinstance(answer, dict):
        return Prediction(error=str(answer.get("error", "TorchServe returned no scores")))
    return Prediction(scores=tuple(ClassScore(str(s["label"]), float(s["probability"])) for s in answer))


def _cuda_available() -> bool:
    import torch  # deferred: the manager is built where start-up time matters

    return torch.cuda.is_available()
