"""Which versions TorchServe serves: deploy behind the promotion gate, the default, unserve, restore.

The served registry (served_registry.py) is the record of what is served; TorchServe, told through its
management API, forgets everything when it restarts, so `restore` registers the registry's versions
again. Every change holds its model's share of the supervisor's lock (ServingLock): none interleaves
with a restart or with another change to the same model, and a version loading for one model (seconds)
holds up no change to another.

The registry may be shared: control-plane replicas on one state volume each run their own TorchServe
(TUNESERVE_TORCHSERVE_FILES_DIR) and one served registry. A replica gates a new version in its own
TorchServe and records it in the registry only once it passed; `sync` (every served_sync_s, from
TorchServeBackend) registers in this TorchServe what the other replicas promoted and drops what they
unserved. What this TorchServe holds is tracked apart from the registry (`held`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from service.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from service.packaging.gate import (
    BF16_TOLERANCE,
    CPU_TOLERANCE,
    GateFailed,
    Reference,
    check_version,
    reference_answers,
)
from service.packaging.management import ManagementClient, RestClient
from service.packaging.model_store import ModelStore
from service.packaging.served_registry import ServedEntry, ServedRegistry, ServedVersion, version_key
from service.packaging.served_sync import HeldVersions, plan_sync
from service.packaging.supervisor import TorchServeSupervisor
from service.records import EventKind
from service.serving_types import Archive, GateImages, ServedModel
from service.spec import ServingSpec

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # a version's worker start and load (what the synchronous registration allowed)
RETRY_FAILED_S = 60.0  # a version sync could not register is tried again this much later


class JobRecords(Protocol):
    """Where a deploy is recorded on its job (the job store, through the backend)."""

    def event(self, job_id: str, kind: EventKind, message: str, data: dict[str, Any]) -> None: ...

    def served(self, job_id: str, model: ServedModel) -> None: ...


class VersionManager:
    """Registers, gates, promotes and removes versions; describes what is served."""

    def __init__(
        self,
        model_store: ModelStore,
        registry: ServedRegistry,
        management: ManagementClient,
        gate_client: RestClient,
        supervisor: TorchServeSupervisor,
        jobs: JobRecords,
        inference_url: str,
    ) -> None:
        self.model_store = model_store
        self.registry = registry
        self.management = management
        self.gate_client = gate_client
        self.supervisor = supervisor
        self.jobs = jobs
        self.inference_url = inference_url
        self.held = HeldVersions()
        self._failed: dict[tuple[str, str], float] = {}  # (model, version) -> when sync tries it again

    def deploy(
        self, archive: Archive, images: GateImages, *, job_id: str, checkpoint: Path, serving: ServingSpec
    ) -> ServedModel:
        """Register the archive as a new version, wait until it is ready, gate it, make it the default.

        Older versions stay registered for rollback. A version that fails the gate is unregistered and
        GateFailed says why; the default does not change. A new version is recorded on its job.
        """
        found = self.model_store.verified(archive.path, archive.sha256)
        name, version = found.name, found.version
        if (name, version) != (archive.name, archive.version):
            raise FailedPrecondition(
                f"archive {found.path.name} holds version {version} of {name}, not version "
                f"{archive.version} of {archive.name}; package the job again"
            )
        with self.supervisor.lock.model(name):
            self.supervisor.require_running()
            entry = self.registry.get(name)
            if entry is not None and version in entry.versions:
                if entry.versions[version].sha256 != archive.sha256:
                    raise AlreadyExists(
                        f"model {name} already serves a different archive as version {version}"
                    )
                return self._set_default(entry, version)  # already served and gated: serving again = promote
            # The checkpoint's own answers need no TorchServe: computed while TorchServe starts the
            # version's worker (seconds of imports in a fresh process), they are ready when it is.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-reference") as pool:
                reference = pool.submit(reference_answers, checkpoint, images.images)
                self._register(name, version, found.path.name, serving)
                try:
                    self._gate(job_id, name, version, reference, images)
                except BaseException:
                    self._unregister_quietly(name, version)
                    raise
            self.management.set_default(name, version)
            self.held.made_default(name, version)
            served = ServedVersion(
                version=version,
                job_id=job_id,
                archive=found.path.name,
                sha256=archive.sha256,
                checkpoint=str(checkpoint),
                batch_size=serving.batch_size,
                max_batch_delay_ms=serving.max_batch_delay_ms,
                workers=serving.workers,
                top_k=serving.top_k,
                served_at=time.time(),
            )
            model = self.describe(self.registry.add(name, served, make_default=True), version)
        self.jobs.served(job_id, model)
        return model

    def set_default(self, name: str, version: str) -> ServedModel:
        """Make a served version the default (rollback is setting an older one)."""
        with self.supervisor.lock.model(name):
            return self._set_default(self.entry(name, version), version)

    def _set_default(self, entry: ServedEntry, version: str) -> ServedModel:
        name = entry.name
        self.supervisor.require_running()
        if not self.held.holds(name, version):  # another replica served it since this one's last sync
            self._register_served(name, entry.versions[version])
        self.management.set_default(name, version)
        self.held.made_default(name, version)
        return self.describe(self.registry.set_default(name, version), version)

    def unserve(self, name: str, version: str | None = None) -> None:
        """Unregister one version (or every version, version None/""); the archives stay in the store."""
        with self.supervisor.lock.model(name):
            entry = self.entry(name, version or None)
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

    def list_served(self) -> list[ServedModel]:
        """Every served model, described by its default version."""
        return [self.describe(entry, entry.default) for entry in self.registry.entries()]

    def restore(self) -> None:
        """Register every version in the registry again (after a start or a restart of TorchServe)."""
        self.held.clear()
        for entry in self.registry.entries():
            for version in entry.ordered_versions():
                try:
                    self._register_served(entry.name, entry.versions[version])
                except Exception:
                    log.exception("could not serve %s version %s again", entry.name, version)
            self._set_default_quietly(entry.name, entry.default)

    def sync(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Serve what the registry says now: the versions other replicas promoted are registered (and
        ready) before they become the default here, the ones they unserved are unregistered. Model by
        model, each under its own lock, so a version loading here holds up changes to its model only.
        Between versions, `stopping()` ends it early (the service is stopping; the next start restores
        all)."""
        now = time.monotonic()
        self._failed = {key: when for key, when in self._failed.items() if when > now}
        names = {entry.name for entry in self.registry.entries()} | set(self.held.snapshot())
        for name in sorted(names):
            if stopping():
                return
            with self.supervisor.lock.model(name):  # never during a change to it, or a restart
                if not self.supervisor.is_running():
                    return  # the restart's restore registers everything
                self._sync_model(name, stopping)

    def _sync_model(self, name: str, stopping: Callable[[], bool]) -> None:
        """One model brought to what the registry says now (read again under the model's lock)."""
        entry, held = self.registry.get(name), self.held.get(name)
        plan = plan_sync({name: entry} if entry else {}, {name: held} if held else {})
        for model in plan.models:
            for served in model.register:
                if stopping():
                    return
                if (model.name, served.version) not in self._failed:
                    self._load(model.name, served)
            if model.default is not None and self.held.holds(model.name, model.default):
                self._set_default_quietly(model.name, model.default)
        for _, version in plan.unregister:  # all of them `name`'s
            if self._unregister_quietly(name, version):
                log.info("%s: version %s is no longer served (unserved through another replica)",
                         name, version)  # fmt: skip

    def _load(self, name: str, served: ServedVersion) -> None:
        """One version sync registers: ready, or unregistered again and left alone for a while (its
        archive may be gone from the store: not again at every sync)."""
        try:
            self._register_served(name, served)
            log.info("%s: serving version %s (promoted through another replica)", name, served.version)
        except Exception:
            self._failed[name, served.version] = time.monotonic() + RETRY_FAILED_S
            self._unregister_quietly(name, served.version)  # never the default while not ready
            log.exception("could not serve %s version %s; tried again in %g s", name, served.version,
                          RETRY_FAILED_S)  # fmt: skip

    def entry(self, name: str, version: str | None) -> ServedEntry:
        """The served model `name` (that serves `version`, when given), or NotFound listing what is."""
        entry = self.registry.get(name)
        if entry is None:
            served = ", ".join(e.name for e in self.registry.entries()) or "none"
            raise NotFound(f"model {name!r} is not served (served models: {served})")
        if version is not None and version not in entry.versions:
            raise NotFound(
                f"model {name} has no version {version!r} (versions: {', '.join(entry.ordered_versions())})"
            )
        return entry

    def describe(self, entry: ServedEntry, version: str) -> ServedModel:
        served = entry.versions[version]
        return ServedModel(
            name=entry.name,
            version=version,
            is_default=version == entry.default,
            job_id=served.job_id,
            archive_sha256=served.sha256,
            ready=self.ready(entry.name, version),
            versions=tuple(entry.ordered_versions()),
            inference_url=f"{self.inference_url}/predictions/{entry.name}",
        )

    def ready(self, name: str, version: str) -> bool:
        """TorchServe runs and has a ready worker for this version."""
        if not self.supervisor.is_running():
            return False
        try:
            return any(info.ready for info in self.management.describe(name, version))
        except (NotFound, Unavailable):
            return False

    # ------------------------------------------------------------------------------------ internals

    def _register(self, name: str, version: str, archive: str, serving: ServingSpec) -> None:
        options = {
            "batch_size": serving.batch_size, "max_batch_delay_ms": serving.max_batch_delay_ms,
            "workers": serving.workers,
        }  # fmt: skip
        try:
            self.management.register(archive, name, **options)
        except AlreadyExists:  # left over from an interrupted deploy: start clean
            self.management.unregister_quietly(name, version)
            self.management.register(archive, name, **options)
        self.held.registered(name, version)  # registered from here on, even if it never gets ready
        try:
            self.management.wait_ready(name, version, READY_TIMEOUT_S)
        except BaseException:
            self._unregister_quietly(name, version)  # else TorchServe retries a broken worker for ever
            raise

    def _register_served(self, name: str, served: ServedVersion) -> None:
        spec = ServingSpec(
            model_name=name, batch_size=served.batch_size, max_batch_delay_ms=served.max_batch_delay_ms,
            workers=served.workers, top_k=served.top_k,
        )  # fmt: skip
        found = self.model_store.verified(self.model_store.folder / served.archive, served.sha256)
        self._register(name, found.version, found.path.name, spec)

    def _unregister_quietly(self, name: str, version: str) -> bool:
        gone = self.management.unregister_quietly(name, version)
        if gone:
            self.held.unregistered(name, version)
        return gone

    def _gate(
        self, job_id: str, name: str, version: str, reference: Future[Reference], images: GateImages
    ) -> None:
        tolerance = BF16_TOLERANCE if _cuda_available() else CPU_TOLERANCE
        started = time.monotonic()
        answers = reference.result()  # done by now, unless the version's worker started faster
        reference_waited = time.monotonic() - started
        result = check_version(self.gate_client, name, version, answers, images.images, tolerance)
        data = {
            "model": name, "version": version, "passed": result.passed, "images": result.images,
            "source": images.source, "tolerance": tolerance, "max_difference": result.max_difference,
            "image": result.image, "seconds": round(time.monotonic() - started, 3),
            "reference_waited_s": round(reference_waited, 3),
        }  # fmt: skip
        if result.passed:
            message = (
                f"promotion gate: version {version} of {name} answers like its checkpoint on "
                f"{images.describe()} (max difference {result.max_difference:.2e}, tolerance {tolerance:g})"
            )
            log.info("job %s: %s", job_id, message)
            self.jobs.event(job_id, EventKind.INFO, message, data)
            return
        default = self.registry.get(name)
        message = (
            f"version {version} of model {name} was not promoted: on {images.describe()} it answers "
            f"differently from its checkpoint ({result.reason}); the default stays "
            f"{default.default if default else 'unset'}"
        )
        self.jobs.event(job_id, EventKind.WARNING, f"promotion gate: {message}", data)
        raise GateFailed(message, result)

    def _set_default_quietly(self, name: str, version: str) -> None:
        try:
            self.management.set_default(name, version)
            self.held.made_default(name, version)
        except Exception:
            log.exception("could not make version %s the default of %s", version, name)


def _cuda_available() -> bool:
    import torch  # deferred: the backend is built where start-up time matters

    return torch.cuda.is_available()
