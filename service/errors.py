"""Domain errors. Each carries the gRPC status it maps to, by name, so domain code never imports grpc.

One interceptor (service.api.interceptors) turns them into statuses; anything else becomes INTERNAL.
Messages name the bad value, what is allowed, and how to fix it.
"""

from __future__ import annotations


class TuneserveError(Exception):
    """Base class: an error the client can act on. `code` is a grpc.StatusCode member name."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TuneserveError):
    code = "INVALID_ARGUMENT"


class NotFound(TuneserveError):
    code = "NOT_FOUND"


class AlreadyExists(TuneserveError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(TuneserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(TuneserveError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(TuneserveError):
    code = "UNAVAILABLE"


class Unauthenticated(TuneserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(TuneserveError):
    code = "PERMISSION_DENIED"


class DatasetError(InvalidArgument):
    """The dataset cannot be used as given (raised at validation or when the worker opens it)."""


class JobCancelled(TuneserveError):
    """Raised inside a worker when the job was asked to stop; not an error for the client."""

    code = "CANCELLED"


def one_line(exc: BaseException) -> str:
    """`Type: message`, first line only: a job's error, short enough for a list."""
    text = str(exc).strip().splitlines()
    message = getattr(exc, "message", None) or (text[0] if text else "")
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# Each status's error class, for a client that turns a status back into the domain error it stood for.
ERRORS_BY_CODE: dict[str, type[TuneserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
    )
}
