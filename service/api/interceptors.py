"""Server interceptors: domain errors -> gRPC statuses (the one place). Auth is service.api.auth.

A TuneserveError aborts the call with its own status and message. Anything else is a bug: it is logged
with its traceback under a short id, and the client gets INTERNAL with that id only, never a trace.
Request bytes that are not the method's message are the client's fault: INVALID_ARGUMENT, not the
INTERNAL grpc gives a failed deserialization by itself.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from service.errors import InvalidArgument, TuneserveError

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 4000  # status details travel in trailers; keep them well under their size limit

Behavior = Callable[[Any, grpc.ServicerContext], Any]


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps TuneserveError to its status; unexpected exceptions to INTERNAL with a log id."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return rebuild(
            handler,
            lambda b: _guard_unary(b, method),
            lambda b: _guard_stream(b, method),
            _lenient(handler.request_deserializer),
        )


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the call can fail as the client's error."""

    def __init__(self, message_type: str, size: int, error: Exception) -> None:
        self.problem = (
            f"the request ({size} bytes) is not a valid {message_type} message ({error}); send that message "
            "serialized, as the generated tuneserve.v1 stubs do"
        )


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # the generated class of `Message.FromString`
    message_type = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or invalid UTF-8 in a string field
            return _Undecodable(message_type, len(data), exc)

    return deserialize


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.problem)


def _guard_unary(behavior: Behavior, method: str) -> Behavior:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _refuse_undecodable(request)
            return behavior(request, context)
        except TuneserveError as exc:
            _abort_domain(context, exc, method)
        except Exception:
            _abort_internal(context, method)

    return guarded


def _guard_stream(behavior: Behavior, method: str) -> Behavior:
    def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            _refuse_undecodable(request)
            yield from behavior(request, context)
        except TuneserveError as exc:
            _abort_domain(context, exc, method)
        except Exception:
            _abort_internal(context, method)

    return guarded


def _abort_domain(context: grpc.ServicerContext, exc: TuneserveError, method: str) -> None:
    log.info("%s -> %s: %s", method, exc.code, exc.message)
    message = (
        exc.message if len(exc.message) <= MAX_MESSAGE_CHARS else exc.message[:MAX_MESSAGE_CHARS] + "..."
    )
    context.abort(grpc.StatusCode[exc.code], message)


def _abort_internal(context: grpc.ServicerContext, method: str) -> None:
    error_id = secrets.token_hex(4)
    log.exception("%s failed unexpectedly (error id %s)", method, error_id)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server log has the details")


def rebuild(
    handler: grpc.RpcMethodHandler,
    wrap_unary_response: Callable[[Behavior], Behavior],
    wrap_stream_response: Callable[[Behavior], Behavior],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (unary or streaming response, as it was), and its
    request deserializer replaced when one is given."""
    args = (request_deserializer or handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary_response(handler.unary_unary), *args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream_response(handler.unary_stream), *args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary_response(handler.stream_unary), *args)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap_stream_response(handler.stream_stream), *args)
