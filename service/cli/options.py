"""What every command shares: the connection from the global options, the output consoles, and the
service's settings for the commands that run something on this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from service.cli import render
from service.cli.client import Client, ClientConfig, CliError

if TYPE_CHECKING:
    from service.settings import Settings


def connect(ctx: typer.Context) -> Client:
    """A client for the server named by the global options (--address, --token, TLS)."""
    config = ctx.find_object(ClientConfig) or ClientConfig()
    return Client(config)


def out() -> Console:
    """stdout, made at call time so that a redirected stdout (tests, pipes) is the one written to."""
    return render.make_console()


def err() -> Console:
    return render.make_console(stderr=True)


def load_settings(**overrides: Any) -> Settings:
    """The service's settings from TUNESERVE_* (plus `overrides`); a bad value is INVALID_ARGUMENT naming
    its variable."""
    from pydantic import ValidationError  # deferred, with Settings: the client commands must start fast

    from service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"TUNESERVE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise CliError("INVALID_ARGUMENT", problems) from None
