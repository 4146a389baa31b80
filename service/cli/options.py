"""What every command shares: the connection from the global options, and the output consoles."""

from __future__ import annotations

import typer
from rich.console import Console

from service.cli import render
from service.cli.client import Client, ClientConfig


def connect(ctx: typer.Context) -> Client:
    """A client for the server named by the global options (--address, --token, TLS)."""
    config = ctx.find_object(ClientConfig) or ClientConfig()
    return Client(config)


def out() -> Console:
    """stdout, made at call time so that a redirected stdout (tests, pipes) is the one written to."""
    return render.make_console()


def err() -> Console:
    return render.make_console(stderr=True)
