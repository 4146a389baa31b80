"""The worker's side of the internal reporting API: a JobReporter over gRPC (service.jobs.worker).

event() only queues: a sender thread delivers the queue in batches, so reporting never waits on the
network inside a training step. result() and move() flush the queue first, so the control plane sees
everything in the order the worker said it. A heartbeat thread tells the control plane the worker is
alive; its reply carries the stop reason ("cancelled", "draining") when the scheduler wants it to stop.

stop_requested() answers from what is already known: a reason from a heartbeat; after SIGTERM the
reason the control plane gives (asked once, "draining" if it cannot be asked); "draining" when the
control plane has been unreachable for `lost_after_s` (the service died: stop at a safe point, the
next service requeues the job) or no longer knows this worker's token (a restarted service).
Calls are retried on UNAVAILABLE until the link has been down for `lost_after_s`.
With `tls_ca` (settings.report_tls_ca) the channel is TLS and trusts that CA alone.

A spare worker connects its channel before its job exists (ReadyChannel): the address and the CA are
no secret and known when it starts, and a connection made then is off the job's critical path. The job's
token travels per call (metadata), never with the channel, so a channel made before the token is safe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc

from service.api.gen.tuneserve.internal.v1 import reporting_pb2 as pb
from service.api.gen.tuneserve.internal.v1 import reporting_pb2_grpc as pb_grpc
from service.errors import ERRORS_BY_CODE, TuneserveError, Unauthenticated, Unavailable
from service.jobs.store_codec import jsonable, result_from_json
from service.records import EventKind, Job, JobState
from service.spec import JobSpec
from service.stop_reasons import DRAINING

log = logging.getLogger(__name__)

BATCH = 500  # events per AppendEvents call, at most
CALL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0  # a spare waits this long for its early connection before it says it is ready
_INT_MAX = 2**31 - 1
_UNREACHED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

Reply = TypeVar("Reply")


class GrpcReporter:
    """Reports one job's work to the control plane at `address`, with that job's `token`."""

    def __init__(
        self,
        address: str,
        token: str,
        job_id: str,
        *,
        heartbeat_s: float = 2.0,
        lost_after_s: float = 10.0,
        tls_ca: Path | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        """`channel`: one already open to `address` with `tls_ca` (ReadyChannel.take_for); the reporter
        owns it from then on and closes it. Without it the reporter opens its own."""
        self.job_id = job_id
        self._heartbeat_s = heartbeat_s
        self._lost_after_s = lost_after_s
        self._channel = channel if channel is not None else open_channel(address, tls_ca)
        self._stub = pb_grpc.ReportingStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._queue: deque[pb.Event] = deque()
        self._next = 0  # the control plane's number for the first event in the queue
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._signalled = threading.Event()
        self._told: str | None = None  # the stop reason a heartbeat reply carried
        self._reason: str | None = None  # the stop reason decided, once and for all
        self._failing_since: float | None = None  # the link is down since (monotonic)
        self._disowned = False  # the control plane does not know our token (any more)
        self._threads = [
            threading.Thread(target=self._send_loop, name="report-sender", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="report-heartbeat", daemon=True),
        ]

    def start(self) -> GrpcReporter:
        for thread in self._threads:
            thread.start()
        return self

    # ------------------------------------------------------------------ Reporter

    def event(self, kind: EventKind, message: str, data: dict[str, Any] | None = None) -> None:
        event = pb.Event(kind=str(kind), message=message, data_json=json.dumps(jsonable(data or {})))
        with self._cond:
            self._queue.append(event)
            self._cond.notify_all()

    def result(self, **fields: Any) -> None:
        self.flush()
        request = pb.MergeResultRequest(job_id=self.job_id, fields_json=json.dumps(jsonable(fields)))
        try:
            self._call(self._stub.MergeResult, request)
        except (Unavailable, Unauthenticated) as exc:
            # as events: with nobody left to tell, the worker stops at its next safe point (stop_requested)
            # and the job resumes from its last checkpoint under the next service, which has the rest
            log.warning(
                "result fields %s of job %s not delivered: %s", sorted(fields), self.job_id, exc.message
            )

    def stop_requested(self) -> str | None:
        if self._reason is None:
            if self._told is not None:
                self._reason = self._told
            elif self._signalled.is_set():
                self._beat()  # SIGTERM says "stop", the control plane says why
                self._reason = self._told or DRAINING
            elif self._disowned or self._lost():
                log.warning("the control plane is unreachable or does not know this worker; stopping")
                self._reason = DRAINING
        return self._reason

    def signal_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: only sets a flag; the engine stops at its next safe point."""
        self._signalled.set()

    # ------------------------------------------------------------------ JobReporter

    def assignment(self) -> Job:
        reply = self._call(self._stub.GetAssignment, pb.AssignmentRequest(job_id=self.job_id))
        return Job(
            id=reply.job_id,
            spec=JobSpec.model_validate(json.loads(reply.spec_json)),
            state=JobState(reply.state),
            created_at=reply.created_at,
            updated_at=reply.updated_at,
            attempts=reply.attempts,
            cancel_requested=reply.cancel_requested,
            result=result_from_json(json.loads(reply.result_json)),
        )

    def move(self, to_state: JobState, reason: str) -> None:
        self.flush()
        self._call(
            self._stub.MoveJob, pb.MoveJobRequest(job_id=self.job_id, state=str(to_state), reason=reason)
        )

    # ------------------------------------------------------------------ delivery

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event is delivered (or given up on); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout)

    def close(self) -> None:
        """Deliver what is queued (bounded by the retry window), then stop the threads."""
        self.flush(timeout=self._lost_after_s + CALL_TIMEOUT_S)
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S)
        self._channel.close()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed.is_set())
                if not self._queue:
                    return
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
                first = self._next
            request = pb.AppendEventsRequest(job_id=self.job_id, first=first, events=batch)
            try:
                self._next = self._call(self._stub.AppendEvents, request).next
            except TuneserveError as exc:
                # the control plane is gone (or has disowned us): nobody is left to tell; the worker stops
                log.warning("%d event(s) of job %s not delivered: %s", len(batch), self.job_id, exc.message)
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._cond.notify_all()

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self._heartbeat_s):
            self._beat()

    def _beat(self) -> None:
        try:
            reply = self._call(self._stub.Heartbeat, pb.HeartbeatRequest(job_id=self.job_id), retry=False)
        except TuneserveError:
            return  # counted by _call; stop_requested() decides when it has lasted too long
        if reply.stop_reason and self._told is None:
            self._told = reply.stop_reason

    def _call(self, method: Callable[..., Reply], request: Any, *, retry: bool = True) -> Reply:
        delay = 0.05
        while True:
            try:
                reply = method(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]  # a call's error is a Call
                details = exc.details() or code.name  # type: ignore[attr-defined]
                if code in _UNREACHED:
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                    if retry and not self._lost() and not self._closed.is_set():
                        time.sleep(delay)
                        delay = min(2 * delay, 1.0)
                        continue
                    raise Unavailable(f"the control plane cannot be reached: {details}") from None
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self._disowned = True
                raise ERRORS_BY_CODE.get(code.name, TuneserveError)(details) from None
            self._failing_since = None
            return reply

    def _lost(self) -> bool:
        since = self._failing_since
        return since is not None and time.monotonic() - since >= self._lost_after_s


class ReadyChannel:
    """A channel to the reporting API opened and connected ahead of the job that will use it (a spare's).

    `take_for` hands it to the job when the job reports to the same address with the same CA; otherwise
    it is closed and the job opens its own (the fallback costs only what a spare saved)."""

    def __init__(
        self, address: str, tls_ca: Path | None, connect_timeout_s: float = CONNECT_TIMEOUT_S
    ) -> None:
        self.address = address
        self.tls_ca = tls_ca
        # an idle spare may wait for hours: without this gRPC drops the connection after 30 idle minutes
        self.channel = open_channel(address, tls_ca, options=[("grpc.client_idle_timeout_ms", _INT_MAX)])
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout_s)
            self.connected = True
        except grpc.FutureTimeoutError:
            # not fatal: the channel keeps trying and the job's first call waits for it as a fresh one would
            self.connected = False
            log.warning(
                "the reporting API at %s not reached in %.0f s; the job will retry",
                address,
                connect_timeout_s,
            )

    def take_for(self, address: str, tls_ca: Path | None) -> grpc.Channel | None:
        """The channel, for a job reporting to `address` with `tls_ca`; None (closed) when they differ."""
        if (address, tls_ca) == (self.address, self.tls_ca):
            return self.channel
        log.info(
            "the job reports to %s (CA %s), not %s (CA %s) as connected ahead: opening a new channel",
            address,
            tls_ca,
            self.address,
            self.tls_ca,
        )
        self.channel.close()
        return None


def open_channel(
    address: str, tls_ca: Path | None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A channel to the reporting API: TLS trusting `tls_ca` only (not the system's roots), else plaintext."""
    if tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    try:
        ca = tls_ca.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"TUNESERVE_REPORT_TLS_CA {tls_ca}: cannot be read ({exc.strerror}); mount the CA there"
        ) from None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options=options)
