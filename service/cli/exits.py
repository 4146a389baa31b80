"""Exit codes, and the one-line error a failed command prints on stderr.

0  success
1  any other error (INTERNAL, UNKNOWN, ...)
2  INVALID_ARGUMENT / OUT_OF_RANGE: the request (a spec, a flag) is wrong; also typer's usage errors
3  NOT_FOUND: no such job, model or version
4  ALREADY_EXISTS / FAILED_PRECONDITION / ABORTED: not possible in the current state
5  UNAUTHENTICATED / PERMISSION_DENIED: token or certificate problem
6  UNAVAILABLE / DEADLINE_EXCEEDED: the server (or TorchServe behind it) cannot be reached in time
7  RESOURCE_EXHAUSTED: queue full, message too large
8  the watched job ended FAILED
9  the watched job ended CANCELLED
130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
import typer

from service.cli.client import CliError

GENERIC = 1
JOB_FAILED = 8
JOB_CANCELLED = 9
INTERRUPTED = 130

EXIT_CODES = {
    "INVALID_ARGUMENT": 2,
    "OUT_OF_RANGE": 2,
    "NOT_FOUND": 3,
    "ALREADY_EXISTS": 4,
    "FAILED_PRECONDITION": 4,
    "ABORTED": 4,
    "UNAUTHENTICATED": 5,
    "PERMISSION_DENIED": 5,
    "UNAVAILABLE": 6,
    "DEADLINE_EXCEEDED": 6,
    "RESOURCE_EXHAUSTED": 7,
}

Command = TypeVar("Command", bound=Callable[..., Any])


def exit_code(status: str) -> int:
    return EXIT_CODES.get(status, GENERIC)


def fail(status: str, message: str) -> NoReturn:
    """Print `error: STATUS: message` as one line on stderr and exit with the status's code."""
    one_line = "; ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    typer.echo(f"error: {status}: {one_line}", err=True)
    raise typer.Exit(exit_code(status))


def guarded(command: Command) -> Command:
    """`command`, with server and CLI errors turned into one line and an exit code instead of a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except grpc.RpcError as exc:
            call = cast(grpc.Call, exc)
            status, details = call.code().name, call.details() or ""
            if status == "UNAVAILABLE":
                details += " (is the server running there? see --address / TUNESERVE_ADDRESS)"
            fail(status, details)
        except CliError as exc:
            fail(exc.status, exc.message)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(INTERRUPTED) from None

    return cast(Command, run)
