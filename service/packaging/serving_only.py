"""A serving replica: TorchServe over a shared model store, with no job store, scheduler or job API.

`tuneserve serve --serving-only` runs this. It is the full service's serving backend
(TorchServeBackend: TorchServe's process, a watchdog that restarts it and registers the models again)
with a registry of its own, filled at start from the shared store (service.packaging.replica_models),
and nothing else: no gRPC port, no training, no promotion gate (the control plane gated what it serves).
Ready means TorchServe's /ping says Healthy and every chosen version has a ready worker, which GET
/ready on --ready-port tells a load balancer (service.packaging.replica_ready); SIGTERM stops
TorchServe and its workers.

Everything the replica writes (TorchServe's config, keys, tmp and logs, its registry) is under
settings.torchserve_dir, which must be its own (an emptyDir in Kubernetes); the model store
(TUNESERVE_MODEL_STORE_DIR) is only read.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from service.errors import FailedPrecondition
from service.packaging.replica_models import (
    ReplicaModels,
    choose_models,
    control_plane_registry,
    write_registry,
)
from service.packaging.replica_ready import ReadinessServer
from service.packaging.torchserve_backend import TorchServeBackend
from service.packaging.ts_config import inference_bind_host
from service.settings import Settings

log = logging.getLogger(__name__)

REPLICA_REGISTRY = "replica_models.json"  # never the control plane's served_models.json


@dataclass
class ServingReplica:
    """A started replica; `stop` stops TorchServe, then the readiness endpoint."""

    backend: TorchServeBackend
    models: ReplicaModels
    readiness: ReadinessServer | None = None

    def ready(self) -> bool:
        """TorchServe answers /ping Healthy and every chosen model's default version has a ready worker."""
        return all(self.backend.health().values())

    def stop(self) -> None:
        self.backend.stop()  # first: /ready turns 503 while TorchServe stops
        if self.readiness is not None:
            self.readiness.stop()
        log.info("serving replica stopped")


def start_replica(
    settings: Settings, *, ready_port: int | None = None, worker_threads: int | None = None
) -> ServingReplica:
    """Start TorchServe with the models chosen from the shared store registered (blocks until they are).
    `ready_port`: serve GET /ready there (service.packaging.replica_ready), from before TorchServe starts."""
    own = settings.torchserve_dir.resolve()
    if own / "served_models.json" == control_plane_registry(settings.model_store):
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
    backend = TorchServeBackend(settings, worker_threads=worker_threads)
    # the backend's own registry file may be the control plane's (same state folder): never write it
    backend.versions.registry = write_registry(models, settings.torchserve_dir / REPLICA_REGISTRY)
    readiness = None
    if ready_port is not None:  # listening before TorchServe starts: the kubelet hears 503, not "refused"
        readiness = ReadinessServer(inference_bind_host(settings), ready_port, backend.health)
        readiness.start()
    try:
        backend.start()
    except BaseException:
        if readiness is not None:
            readiness.stop()
        raise
    replica = ServingReplica(backend, models, readiness)
    log.info("serving replica is ready: %s", "yes" if replica.ready() else "no (see TorchServe's logs)")
    return replica


def run_serving_only(settings: Settings, *, ready_port: int | None = None) -> None:
    """Run a serving replica until SIGTERM or SIGINT, then stop TorchServe."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping TorchServe", signal.Signals(signum).name)
        stop.set()

    # before start-up: a SIGTERM while TorchServe starts must still stop it, not orphan its JVM
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if not settings.torchserve_enabled:
        raise FailedPrecondition(
            "serve --serving-only runs TorchServe alone, and TUNESERVE_TORCHSERVE_ENABLED is false; "
            "unset it (or set it to true)"
        )
    replica = start_replica(settings, ready_port=ready_port)
    stop.wait()
    replica.stop()
