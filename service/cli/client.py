"""The connection to a tuneserve server: channel, stubs, bearer token, TLS, and one error type.

Where to connect and how to authenticate come from flags or the environment:
  TUNESERVE_ADDRESS      host:port of the gRPC API (default 127.0.0.1:50051)
  TUNESERVE_AUTH_TOKEN   bearer token (the same variable the server reads)
  TUNESERVE_TLS          1: use TLS with the system's root certificates
  TUNESERVE_CA_CERT      PEM file of the CA that signed the server's certificate (implies TLS)
  TUNESERVE_CLIENT_CERT, TUNESERVE_CLIENT_KEY   a client certificate, for servers that require mTLS
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # predict sends whole images; the server sets the real limit
FIXED_HEALTH_NAMES = ("", "tuneserve.v1.FineTuning", "tuneserve.v1.Inference")  # a server without List

Response = TypeVar("Response")


class CliError(Exception):
    """A problem to show as one line `error: <STATUS>: <message>`; `status` names a grpc.StatusCode."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server; built once from the global options."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


class Client:
    """Stubs for both services and health, each call carrying the token and a deadline."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.channel = open_channel(config)
        self.jobs = pb_grpc.FineTuningStub(self.channel)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    def call(self, rpc: Callable[..., Response], request: Any, timeout_s: float | None = None) -> Response:
        """One unary call with the token and the configured deadline."""
        return rpc(request, metadata=self.metadata, timeout=timeout_s or self.config.timeout_s)

    def stream(self, rpc: Callable[..., Iterator[Response]], request: Any) -> Iterator[Response]:
        """A server stream with the token; no deadline (a watch lasts as long as the job)."""
        return rpc(request, metadata=self.metadata)

    def get_job(self, job_id: str) -> pb.Job:
        return self.call(self.jobs.GetJob, pb.GetJobRequest(job_id=job_id))

    def served_model(self, name: str) -> pb.ServedModel | None:
        """The served model called `name`, or None when serving cannot tell (callers use it as a nicety)."""
        try:
            answer = self.call(self.jobs.ListServedModels, pb.ListServedModelsRequest())
        except grpc.RpcError:
            return None
        return next((m for m in answer.models if m.name == name), None)

    def health_status(self, service: str = "") -> int:
        """The health service's status for `service` (a health_pb2.HealthCheckResponse value)."""
        answer = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)

    def health_statuses(self) -> dict[str, int]:
        """Every name the server publishes -> its status (health `List`); an older server without `List`
        is asked for the fixed names one by one."""
        try:
            answer = self.health.List(health_pb2.HealthListRequest(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return {name: self.health_status(name) for name in FIXED_HEALTH_NAMES}
        return {name: int(response.status) for name, response in answer.statuses.items()}

    def wait_until_serving(self, timeout_s: float, service: str = "") -> None:
        """Poll health until SERVING; CliError UNAVAILABLE naming the address when it never is."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self.health_status(service)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.3)
        raise CliError(
            "UNAVAILABLE",
            f"the server at {self.config.address} was not SERVING within {timeout_s:.0f} s ({last})",
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_channel(config: ClientConfig) -> grpc.Channel:
    """An insecure channel, or a TLS one when TLS is asked for or any certificate is given."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if not (config.tls or config.ca_cert or config.client_cert):
        return grpc.insecure_channel(config.address, options=options)
    if bool(config.client_cert) != bool(config.client_key):
        raise CliError("INVALID_ARGUMENT", "--client-cert and --client-key go together; give both or neither")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(config.ca_cert, "--ca-cert"),
        private_key=_read(config.client_key, "--client-key"),
        certificate_chain=_read(config.client_cert, "--client-cert"),
    )
    return grpc.secure_channel(config.address, credentials, options=options)


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError("INVALID_ARGUMENT", f"{option} {path}: {exc.strerror or exc}") from None
