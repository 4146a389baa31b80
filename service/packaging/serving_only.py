"""A serving replica: TorchServe over a shared model store, with no job store, scheduler or job API.

`tuneserve serve --serving-only` runs this. It is built from the full service's TorchServe parts
(TorchServeProcess and its files, TorchServeSupervisor's watchdog, the management client) and a
registry of its own, filled at start from the shared store (service.packaging.replica_models), and
nothing else: no gRPC port, no training, no promotion gate (the control plane gated what it serves),
and no torch in this process (TorchServe's workers load the models; the full backend's import chain
costs seconds and hundreds of MB that a replica would never use).

With a sync interval the replica follows the store: a version the control plane starts serving is
registered (and ready) before it becomes the default; one it stops serving is unregistered.

Ready means TorchServe's /ping says Healthy and every served model's default version has a ready
worker, which GET /ready on --ready-port tells a load balancer (service.packaging.replica_ready).
SIGTERM stops TorchServe and its workers.

Everything the replica writes (TorchServe's config, keys, tmp and logs, its registry) is under
settings.torchserve_dir, which must be its own (an emptyDir in Kubernetes); the model store
(TUNESERVE_MODEL_STORE_DIR) is only read.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from service.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from service.packaging.management import ManagementClient, RestClient
from service.packaging.replica_models import choose_models, control_plane_registry, write_registry
from service.packaging.replica_ready import ReadinessServer
from service.packaging.served_registry import ServedRegistry, ServedVersion
from service.packaging.served_sync import plan_sync
from service.packaging.supervisor import TorchServeSupervisor
from service.packaging.torchserve_process import TorchServeProcess
from service.packaging.ts_config import inference_bind_host, management_url
from service.settings import Settings
from service.stop_signals import stop_on_signals

log = logging.getLogger(__name__)

REPLICA_REGISTRY = "replica_models.json"  # never the control plane's served_models.json
READY_TIMEOUT_S = 300.0  # a model's first worker: a cold node loads torch and the weights


class ServingReplica:
    """TorchServe, its watchdog, and the versions it must serve (registered again after a restart)."""

    def __init__(self, settings: Settings, registry: ServedRegistry, *, worker_threads: int | None = None):
        self.model_store = settings.model_store
        self.registry = registry
        self.process = TorchServeProcess(settings, worker_threads=worker_threads)
        self.supervisor = TorchServeSupervisor(self.process)
        rest = RestClient(management_url(settings), "management", self.process.keys, self.process.renew_keys)
        self.management = ManagementClient(rest)
        self.readiness: ReadinessServer | None = None
        self._stopping = threading.Event()
        self._syncer: threading.Thread | None = None

    def start(self, sync_interval_s: float = 0.0) -> None:
        """Start TorchServe with every version registered (blocks until their workers are ready); with
        `sync_interval_s`, follow the shared store's served versions at that interval (see `sync`)."""
        self.supervisor.start(restore=self.register_all)
        if sync_interval_s > 0:
            self._syncer = threading.Thread(
                target=self._follow, args=(sync_interval_s,), name="replica-sync", daemon=True
            )
            self._syncer.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._syncer is not None:  # a sync loading a new version finishes it first (bounded)
            self._syncer.join(timeout=READY_TIMEOUT_S)
        self.supervisor.stop()  # first: /ready turns 503 while TorchServe stops
        if self.readiness is not None:
            self.readiness.stop()
        log.info("serving replica stopped")

    def register_all(self) -> None:
        """Register every version of the registry and set each default (after each TorchServe start)."""
        for entry in self.registry.entries():
            for version in entry.ordered_versions():
                try:
                    self._register(entry.name, entry.versions[version])
                except Exception:  # one bad archive must not keep the others from serving
                    log.exception("could not serve %s version %s", entry.name, version)
            try:
                self.management.set_default(entry.name, entry.default)
            except Exception:
                log.exception("could not make version %s the default of %s", entry.default, entry.name)

    def sync(self) -> None:
        """Serve what the shared store says now: new versions are registered and ready before they
        become the default, defaults move, versions no longer served are unregistered last."""
        wanted = {entry.name: entry for entry in choose_models(self.model_store).entries}
        if not wanted and self.registry.entries():
            # more likely a shared volume that lists empty for a moment than a control plane that
            # unserved everything at once: keep serving (a restart starts from what is there)
            log.warning(
                "the model store %s offers nothing to serve now; keeping what is served", self.model_store
            )
            return
        with self.supervisor.lock.alone():  # never while the watchdog restarts TorchServe
            if not self.supervisor.is_running():
                return  # the watchdog's restart registers the registry; the next sync catches up
            plan = plan_sync(wanted, {entry.name: entry for entry in self.registry.entries()})
            for model in plan.models:
                for served in model.register:
                    self._add(model.name, served)
                have = self.registry.get(model.name)
                version = model.default
                if have is not None and version in have.versions and have.default != version:
                    self.management.set_default(model.name, version)
                    self.registry.set_default(model.name, version)
                    log.info("%s: default version is now %s", model.name, version)
            for name, version in plan.unregister:
                self._remove(name, version)

    def _add(self, name: str, served: ServedVersion) -> None:
        try:
            self._register(name, served)
        except Exception:
            log.exception("could not serve %s version %s; the next sync tries again", name, served.version)
            return
        self.registry.add(name, served, make_default=False)
        log.info("%s: serving version %s", name, served.version)

    def _register(self, name: str, served: ServedVersion) -> None:
        """Register one version and wait until a worker is ready (one registered already is fine)."""
        with contextlib.suppress(AlreadyExists):
            self.management.register(
                served.archive, name, batch_size=served.batch_size,
                max_batch_delay_ms=served.max_batch_delay_ms, workers=served.workers,
            )  # fmt: skip
        try:
            self.management.wait_ready(name, served.version, READY_TIMEOUT_S)
        except BaseException:
            # else TorchServe retries a broken worker for ever; the next sync registers it again
            self.management.unregister_quietly(name, served.version)
            raise

    def _remove(self, name: str, version: str) -> None:
        if not self.management.unregister_quietly(name, version):
            log.warning("%s: version %s is still served; the next sync tries again", name, version)
            return
        self.registry.remove(name, version)
        log.info("%s: version %s is no longer served", name, version)

    def _follow(self, interval_s: float) -> None:
        while not self._stopping.wait(interval_s):
            try:
                self.sync()
            except Exception:  # e.g. the shared volume is briefly unreadable: keep serving what we have
                log.exception("could not follow the model store %s", self.model_store)

    def health(self) -> dict[str, bool]:
        """`torchserve` (runs, /ping Healthy) and `torchserve/<model>` (its default has a ready worker)."""
        alive = self.supervisor.alive()
        status = {"torchserve": alive}
        for entry in self.registry.entries():
            status[f"torchserve/{entry.name}"] = alive and self._ready(entry.name, entry.default)
        return status

    def ready(self) -> bool:
        return all(self.health().values())

    def _ready(self, name: str, version: str) -> bool:
        try:
            return any(info.ready for info in self.management.describe(name, version))
        except (NotFound, Unavailable):
            return False


def start_replica(
    settings: Settings,
    *,
    ready_port: int | None = None,
    sync_interval_s: float = 0.0,
    worker_threads: int | None = None,
) -> ServingReplica:
    """Choose the versions from the shared store, start TorchServe with them registered (blocks until
    they are). `ready_port`: serve GET /ready there, from before TorchServe starts. `sync_interval_s`:
    follow the store's served versions at that interval (0: only those found at start)."""
    if settings.torchserve_dir.resolve() / "served_models.json" == control_plane_registry(
        settings.model_store
    ):
        # same folder as a control plane: its TorchServe's pid file, keys and ports would be ours too
        log.warning(
            "serving-only with the control plane's own state folder %s: stop the full service first, or "
            "give this replica its own TUNESERVE_STATE_DIR and TUNESERVE_MODEL_STORE_DIR=%s",
            settings.state_dir, settings.model_store,
        )  # fmt: skip
    if settings.torchserve_token_auth:
        log.warning(
            "TorchServe token authorization is on: each replica writes its own keys, so clients behind a "
            "load-balanced Service cannot hold the right one; set TUNESERVE_TORCHSERVE_TOKEN_AUTH=false "
            "and restrict who reaches inference at the network (a NetworkPolicy, a mesh, an ingress)"
        )
    models = choose_models(settings.model_store)
    names = ", ".join(f"{e.name} (versions {', '.join(e.ordered_versions())}; default {e.default})"
                      for e in models.entries)  # fmt: skip
    log.info(
        "serving only: TorchServe over %s, no training, no job API, no scheduler; serving %s: %s",
        settings.model_store, models.source, names or "nothing (no archives found)",
    )  # fmt: skip
    settings.torchserve_dir.mkdir(parents=True, exist_ok=True)
    registry = write_registry(models, settings.torchserve_dir / REPLICA_REGISTRY)
    replica = ServingReplica(settings, registry, worker_threads=worker_threads)
    if ready_port is not None:  # listening before TorchServe starts: the kubelet hears 503, not "refused"
        replica.readiness = ReadinessServer(inference_bind_host(settings), ready_port, replica.health)
        replica.readiness.start()
    try:
        replica.start(sync_interval_s)
    except BaseException:
        if replica.readiness is not None:
            replica.readiness.stop()
        raise
    log.info("serving replica is ready: %s", "yes" if replica.ready() else "no (see TorchServe's logs)")
    return replica


def run_serving_only(
    settings: Settings, *, ready_port: int | None = None, sync_interval_s: float = 0.0
) -> None:
    """Run a serving replica until SIGTERM or SIGINT, then stop TorchServe."""
    stop = stop_on_signals("stopping TorchServe")  # before start-up: TorchServe's start is stopped too
    if not settings.torchserve_enabled:
        raise FailedPrecondition(
            "serve --serving-only runs TorchServe alone, and TUNESERVE_TORCHSERVE_ENABLED is false; "
            "unset it (or set it to true)"
        )
    replica = start_replica(settings, ready_port=ready_port, sync_interval_s=sync_interval_s)
    stop.wait()
    replica.stop()
