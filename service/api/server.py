"""The gRPC server: tuneserve's two services, health (per service), reflection, interceptors, TLS.

build_server binds and starts it; `port` is the bound port (settings.port 0 picks a free one).
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.access.tokens_file import ClientDirectory
from service.api.auth import AuthInterceptor
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.api.interceptors import ErrorInterceptor
from service.api.servicer import FineTuningServicer, InferenceServicer
from service.jobs.manager import JobManager
from service.packaging.backend import ServingBackend
from service.settings import Settings

log = logging.getLogger(__name__)

FINE_TUNING = pb.DESCRIPTOR.services_by_name["FineTuning"].full_name  # tuneserve.v1.FineTuning
INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # tuneserve.v1.Inference
OVERALL = ""  # the health service's name for the server as a whole

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ListingHealthServicer(health.HealthServicer):
    """grpcio-health-checking's servicer, with the `List` RPC it leaves UNIMPLEMENTED: every name published,
    so `tuneserve health` shows `torchserve/<model>` without knowing the models. A name set to
    SERVICE_UNKNOWN (a model no longer served) is left out, as if it had never been there."""

    def __init__(self) -> None:
        super().__init__()
        self._published: dict[str, int] = {OVERALL: SERVING}  # the library's own start: "" SERVING
        self._published_lock = threading.Lock()

    def set(self, service: str, status: int) -> None:
        super().set(service, status)
        with self._published_lock:
            self._published[service] = status

    def List(
        self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthListResponse:
        with self._published_lock:
            known = {name: status for name, status in self._published.items() if status != UNKNOWN}
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in known.items()}  # type: ignore[arg-type]
        )


@dataclass
class TuneserveServer:
    """A started gRPC server and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    jobs: JobManager

    def set_serving(self, service: str, serving: bool | None) -> None:
        """SERVING, NOT_SERVING, or (None) SERVICE_UNKNOWN for a name that is gone."""
        status = UNKNOWN if serving is None else SERVING if serving else NOT_SERVING
        self.health.set(service, status)

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, end open watches, finish in-flight calls for up to `grace_s`, then stop."""
        for service in (OVERALL, FINE_TUNING, INFERENCE):
            self.set_serving(service, False)
        self.jobs.close()
        self.server.stop(grace_s).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def build_server(
    settings: Settings,
    jobs: JobManager,
    serving: ServingBackend | None = None,
    clients: ClientDirectory | None = None,
) -> TuneserveServer:
    """Create, bind and start the server on settings.host:settings.port. `clients`: who may call (default:
    from settings; None there means no authentication)."""
    clients = clients or client_directory(settings)
    # auth first: a rejected call never reaches a servicer; errors inside it map to their statuses
    interceptors: list[grpc.ServerInterceptor] = [AuthInterceptor(clients), ErrorInterceptor()]
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a taken port is an error, not a second listener
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=options,
    )
    pb_grpc.add_FineTuningServicer_to_server(FineTuningServicer(settings, jobs, serving), server)
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(serving), server)
    health_servicer = ListingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (FINE_TUNING, INFERENCE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    port = (
        server.add_secure_port(address, _credentials(settings))
        if settings.tls_cert
        else server.add_insecure_port(address)
    )
    server.start()
    running = TuneserveServer(server, port, health_servicer, jobs)
    running.set_serving(OVERALL, True)
    running.set_serving(FINE_TUNING, True)
    running.set_serving(INFERENCE, serving is not None)
    log.info(
        "gRPC server listening on %s:%d (%s)",
        settings.host,
        port,
        "TLS" if settings.tls_cert else "plaintext",
    )
    return running


def client_directory(settings: Settings) -> ClientDirectory | None:
    """The clients settings name (the shared token, the tokens file), or None when neither is set.
    A tokens file that cannot be used raises TokensFileError naming it."""
    token = settings.auth_token.get_secret_value() if settings.auth_token is not None else None
    if not token and settings.auth_tokens_file is None:
        return None
    return ClientDirectory(token or None, settings.auth_tokens_file)


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TUNESERVE_TLS_CERT and TUNESERVE_TLS_KEY must be set together")
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,  # mTLS when a client CA is given
    )
