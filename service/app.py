"""The service, assembled: job store -> scheduler (launcher, reporting API) -> serving -> gRPC server.

`run_service(settings)` is what `tuneserve serve` and the container entrypoint call: it starts
everything, blocks until SIGTERM/SIGINT, then stops in the order that loses nothing: the API stops
taking calls, running jobs checkpoint and go back to the queue, the workers' reporting API stops,
TorchServe stops, the store closes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.api.health import HealthReporter
from service.api.reporting_server import ReportingServer, start_reporting_server
from service.api.server import (
    FINE_TUNING,
    INFERENCE,
    OVERALL,
    TuneserveServer,
    build_server,
    client_directory,
)
from service.errors import FailedPrecondition
from service.heap import freeze_imports
from service.jobs.intake import intake_for
from service.jobs.launcher import Launcher
from service.jobs.local_launcher import LocalProcessLauncher
from service.jobs.manager import JobManager
from service.jobs.scheduler import Scheduler
from service.jobs.store import JobStore
from service.jobs.store_open import store_target
from service.jobs.torchrun_launcher import ByWorldSize, TorchrunLauncher
from service.packaging.backend import ServingBackend
from service.records import JobState
from service.settings import Settings
from service.stop_signals import stop_on_signals
from service.training_imports import import_training_modules

log = logging.getLogger(__name__)

API_GRACE_S = 5.0  # in-flight calls get this long to finish when the service stops
# A stop soon after the start waits this long at most for the admission's imports (see Service.stop)
PRELOAD_WAIT_S = 60.0


@dataclass
class Service:
    """Everything that runs in the service process, stopped together."""

    settings: Settings
    store: JobStore
    scheduler: Scheduler
    server: TuneserveServer
    reporting: ReportingServer
    serving: ServingBackend | None = None
    backend: ServingBackend | None = None  # the serving backend this service started (and stops)
    health_reporter: HealthReporter | None = None
    jobs_health: HealthReporter | None = None  # "" and FineTuning: the store takes writes, scheduling runs
    preload: threading.Thread | None = None  # importing what admitting a job imports (_preload_admission)
    _stopped: bool = field(default=False, init=False)

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, drain: bool = True) -> None:
        """Stop the API, then drain (or kill) running jobs back to the queue, then TorchServe. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        log.info("stopping (drain=%s)", drain)
        for reporter in (self.jobs_health, self.health_reporter):
            if reporter is not None:
                reporter.stop()
        self.server.stop(API_GRACE_S)
        self.scheduler.stop(drain=drain)
        self.reporting.stop()  # after the drain: stopping workers report their last events through it
        if self.backend is not None:
            self.backend.stop()
        self.store.close()
        if self.preload is not None:
            _let_the_import_end(self.preload)
        log.info("stopped")


def start_service(
    settings: Settings, serving: ServingBackend | None = None, launcher: Launcher | None = None
) -> Service:
    """Start the whole service. `serving` replaces the serving backend (tests; it is neither started nor
    stopped here); by default the TorchServe backend is started when settings.torchserve_enabled.
    `launcher` starts the workers (default: default_launcher(), as settings.launcher says)."""
    # a bad TUNESERVE_SERVING_GPUS fails here, before anything starts
    serving_gpus = settings.serving_gpu_indices
    clients = client_directory(settings)  # so does a bad tokens file
    log.info(
        "GPUs %s: jobs train on %s, TorchServe on %s", settings.gpus, settings.training_gpus, serving_gpus
    )
    target = store_target(settings)
    refuse_replicas_on_sqlite(settings, target)  # before anything is created or started
    refuse_a_shared_torchserve_folder(settings)
    for folder in (settings.state_dir, settings.jobs_dir, settings.model_store, settings.weights_dir):
        folder.mkdir(parents=True, exist_ok=True)
    store = JobStore(target)
    intake = intake_for(store, settings)
    reporting = start_reporting_server(settings, intake)  # first: a taken port leaves nothing running
    backend = None
    if serving is None and settings.torchserve_enabled:
        try:
            backend = serving = start_backend(settings, store)
        except BaseException:
            reporting.stop()
            store.close()
            raise
    # pods dial the reporting Service; local workers the address it is bound to
    report_address = settings.report_advertise_address or reporting.address
    try:
        launcher = launcher or default_launcher(settings, store, report_address)
    except BaseException:  # no kubernetes client or configuration: leave nothing running
        reporting.stop()
        if backend is not None:
            backend.stop()
        store.close()
        raise
    scheduler = Scheduler(
        settings,
        store,
        launcher,
        intake,
        report_address,
        deployer=serving.deploy_job if serving is not None else None,
    )
    scheduler.start()  # before the API opens: interrupted jobs are back in the queue when clients look
    preload = threading.Thread(target=_preload_admission, name="preload-admission", daemon=True)
    preload.start()
    try:
        server = build_server(settings, JobManager(settings, store, wake=scheduler.wake), serving, clients)
    except BaseException:  # e.g. the port is taken: leave no workers or TorchServe behind
        scheduler.stop(drain=False)
        reporting.stop()
        if backend is not None:
            backend.stop()
        store.close()
        _let_the_import_end(preload)  # the process exits next
        raise
    jobs_health = HealthReporter(
        jobs_probe(store, scheduler), server.set_serving, settings.health_interval_s, names=JOBS_NAMES
    )
    jobs_health.start()
    reporter = None
    if backend is not None:  # Inference's health follows the backend: down while it restarts
        backend.on_availability(lambda available: server.set_serving(INFERENCE, available))
        reporter = HealthReporter(backend.health, server.set_serving)  # torchserve, torchserve/<model>
        reporter.start()
    return Service(
        settings, store, scheduler, server, reporting, serving, backend, reporter, jobs_health, preload
    )


JOBS_NAMES = (OVERALL, FINE_TUNING)


def refuse_replicas_on_sqlite(settings: Settings, target: Path | str) -> None:
    """A named replica (TUNESERVE_REPLICA_ID) on the SQLite file is refused: SQLite takes no leases, so each
    replica would re-queue the others' running jobs at its start and run them a second time, and SQLite's
    locks do not hold on the network filesystems a shared volume uses."""
    if settings.replica_id is not None and isinstance(target, Path):
        raise FailedPrecondition(
            f"TUNESERVE_REPLICA_ID={settings.replica_id!r} names a replica, but the job store is the SQLite "
            f"file {target}, which only one replica may use: set TUNESERVE_DATABASE_URL to the PostgreSQL "
            "all replicas share, or unset TUNESERVE_REPLICA_ID to run a single replica"
        )


def refuse_a_shared_torchserve_folder(settings: Settings) -> None:
    """A named replica's TorchServe keeps its files in a folder of its own: in the shared state folder,
    every replica's TorchServe would write the same pid file, keys and config (and stop the others' as
    orphans). The served registry stays shared (settings.served_registry_file)."""
    shared = settings.served_registry_file.parent.resolve()  # what TorchServe's files would share
    if (
        settings.replica_id is not None
        and settings.torchserve_enabled
        and settings.torchserve_dir.resolve() == shared
    ):
        raise FailedPrecondition(
            f"TUNESERVE_REPLICA_ID={settings.replica_id!r} names a replica, and its TorchServe would keep "
            f"its pid file, keys and config in {settings.torchserve_dir}, on the state volume every replica "
            "shares: set TUNESERVE_TORCHSERVE_FILES_DIR to a folder of this replica's own (an emptyDir), "
            "or TUNESERVE_TORCHSERVE_ENABLED=false"
        )


def default_launcher(settings: Settings, store: JobStore, report_address: str | None = None) -> Launcher:
    """TUNESERVE_LAUNCHER: TrainJobs on Kubernetes, or local processes (torchrun for a DDP job).
    `report_address`: the reporting API's, for the local launcher's spare worker to connect ahead."""
    if settings.launcher == "kubernetes":
        from service.jobs.k8s_launcher import KubernetesLauncher  # needs the k8s extra

        return KubernetesLauncher(settings, lambda job_id: store.get_job(job_id).state == JobState.FAILED)
    return ByWorldSize(
        LocalProcessLauncher(settings, report_address=report_address), TorchrunLauncher(settings)
    )


def jobs_probe(store: JobStore, scheduler: Scheduler) -> Callable[[], dict[str, bool]]:
    """The health of the job side: SERVING while a write reaches the store and the scheduler thread runs."""

    def probe() -> dict[str, bool]:
        scheduling = scheduler.healthy()  # first: a dead scheduler thread is restarted by this look
        store.check_writable()  # raises when it cannot: the reporter logs it and reports NOT_SERVING
        return dict.fromkeys(JOBS_NAMES, scheduling)

    return probe


def _preload_admission() -> None:
    """Import what admitting a job imports (timm among it: ~1 s on a 2-core CPU) now, not in the first
    CreateJob. The serving backend used to import it by the way; since TorchServe's workers stopped
    importing timm (service.training.registry imports it lazily) nothing did before the first job."""
    try:
        import_training_modules()  # a CreateJob meanwhile waits for it (service.training_imports)
    except Exception:  # the first CreateJob imports them again and reports what fails
        log.exception("preloading the admission's modules failed")
    freeze_imports()  # after the last big import: see service.heap


def _let_the_import_end(preload: threading.Thread) -> None:
    # an import still under way when the process exits races the interpreter's exit handlers (torch's
    # handlers unregister its operators under the import: it fails with a traceback in the log)
    preload.join(PRELOAD_WAIT_S)


def run_service(settings: Settings | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings or Settings()  # type: ignore[call-arg]  # defaults + TUNESERVE_* env
    stop = stop_on_signals("draining")  # before start-up: TorchServe's start is stopped too
    service = start_service(settings)  # a bad tokens file raises here (TokensFileError), before anything runs
    log.info("tuneserve is serving on %s:%d", settings.host, service.port)
    stop.wait()
    service.stop(drain=True)


def start_backend(settings: Settings, store: JobStore) -> ServingBackend:
    """Start the serving backend (TorchServe's modules are imported only when serving is on)."""
    from service.packaging.choose_backend import serving_backend

    backend = serving_backend(settings, store)
    backend.start()
    return backend
