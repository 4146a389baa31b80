"""The internal reporting API's server: what workers call to read their job and report (reporting.proto).

A gRPC server of its own, apart from the public API: bound to settings.report_host (loopback by default)
on settings.report_port (0: a free port), without the public API's bearer token. Its callers prove who
they are with a job-scoped token (service.jobs.intake checks it); the servicer only translates.
With settings.report_tls_cert/key it serves TLS (workers trust settings.report_tls_ca): the token then
never crosses the network in clear. TLS adds to the token check, it does not replace it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent import futures
from dataclasses import dataclass

import grpc

from service.api.gen.tuneserve.internal.v1 import reporting_pb2 as pb
from service.api.gen.tuneserve.internal.v1 import reporting_pb2_grpc as pb_grpc
from service.api.interceptors import ErrorInterceptor
from service.api.tls_reload import ReloadingCertificate
from service.errors import InvalidArgument, Unauthenticated
from service.jobs.intake import Intake
from service.jobs.store_codec import jsonable
from service.records import EventKind, JobState
from service.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WORKERS = 8  # a heartbeat and an event batch per running worker; calls are short


class ReportingServicer(pb_grpc.ReportingServicer):
    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def GetAssignment(self, request: pb.AssignmentRequest, context: grpc.ServicerContext) -> pb.Assignment:
        job = self.intake.assignment(_token(context), request.job_id)
        return pb.Assignment(
            job_id=job.id,
            state=str(job.state),
            spec_json=json.dumps(job.spec.to_dict()),
            attempts=job.attempts,
            result_json=json.dumps(jsonable(dataclasses.asdict(job.result))),
            created_at=job.created_at,
            updated_at=job.updated_at,
            cancel_requested=job.cancel_requested,
        )

    def AppendEvents(
        self, request: pb.AppendEventsRequest, context: grpc.ServicerContext
    ) -> pb.AppendEventsReply:
        events = [(_kind(e.kind), e.message, _object(e.data_json, "data_json")) for e in request.events]
        return pb.AppendEventsReply(
            next=self.intake.append_events(_token(context), request.job_id, request.first, events)
        )

    def MergeResult(
        self, request: pb.MergeResultRequest, context: grpc.ServicerContext
    ) -> pb.MergeResultReply:
        fields = _object(request.fields_json, "fields_json")
        self.intake.merge_result(_token(context), request.job_id, fields)
        return pb.MergeResultReply()

    def MoveJob(self, request: pb.MoveJobRequest, context: grpc.ServicerContext) -> pb.MoveJobReply:
        job = self.intake.move(_token(context), request.job_id, _state(request.state), request.reason)
        return pb.MoveJobReply(state=str(job.state))

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(stop_reason=self.intake.heartbeat(_token(context), request.job_id) or "")


@dataclass
class ReportingServer:
    server: grpc.Server
    host: str
    port: int

    @property
    def address(self) -> str:
        """What a worker dials."""
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()


def start_reporting_server(settings: Settings, intake: Intake) -> ReportingServer:
    """Bind and start the internal reporting API on settings.report_host:report_port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="report"),
        interceptors=[ErrorInterceptor()],
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_ReportingServicer_to_server(ReportingServicer(intake), server)
    address = f"{settings.report_host}:{settings.report_port}"
    if settings.report_tls:
        port = server.add_secure_port(address, _credentials(settings))
    else:
        port = server.add_insecure_port(address)
        if settings.report_host not in LOOPBACK:
            log.warning(
                "the internal reporting API serves plaintext on %s: each worker's job token travels in "
                "clear (set TUNESERVE_REPORT_TLS_CERT, _KEY and _CA)",
                address,
            )
    server.start()
    log.info(
        "internal reporting API listening on %s:%d (%s)",
        settings.report_host,
        port,
        "TLS" if settings.report_tls else "plaintext",
    )
    return ReportingServer(server, settings.report_host, port)


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    """The server's certificate and key, read now (a wrong path stops the start, naming it) and again
    whenever the files change (a renewed certificate needs no restart)."""
    assert settings.report_tls_cert is not None and settings.report_tls_key is not None  # report_tls
    return ReloadingCertificate(settings.report_tls_cert, settings.report_tls_key).credentials()


def _token(context: grpc.ServicerContext) -> str:
    header = dict(context.invocation_metadata() or ()).get("authorization", "")
    scheme, _, token = str(header).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing `authorization: Bearer <token>`: the worker's token from its launch")
    return token.strip()


def _kind(name: str) -> EventKind:
    try:
        return EventKind(name)
    except ValueError:
        raise InvalidArgument(f"event kind {name!r}; use one of {[k.value for k in EventKind]}") from None


def _state(name: str) -> JobState:
    try:
        return JobState(name)
    except ValueError:
        raise InvalidArgument(f"job state {name!r}; use one of {[s.value for s in JobState]}") from None


def _object(text: str, field: str) -> dict:  # type: ignore[type-arg]
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise InvalidArgument(f"{field} is not JSON ({exc}); send a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} is a JSON {type(value).__name__}; send a JSON object")
    return value
