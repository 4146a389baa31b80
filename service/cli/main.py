"""`tuneserve`: the command line. Global options say where the server is; each command is one RPC or two.

Errors from the server are printed as one line, `error: <STATUS>: <message>`, with the exit codes
listed in service.cli.exits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from service.cli import jobs_cmds, local_cmds, models_cmds, serving_cmds
from service.cli.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, ClientConfig
from service.cli.exits import guarded

app = typer.Typer(
    name="tuneserve",
    help="Fine-tune pretrained vision models over gRPC and serve them with TorchServe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main(
    ctx: typer.Context,
    address: Annotated[
        str, typer.Option(envvar="TUNESERVE_ADDRESS", help="host:port of the tuneserve gRPC API")
    ] = DEFAULT_ADDRESS,
    token: Annotated[
        str | None, typer.Option(envvar="TUNESERVE_AUTH_TOKEN", help="bearer token", show_default=False)
    ] = None,
    tls: Annotated[bool, typer.Option(envvar="TUNESERVE_TLS", help="TLS with the system's roots")] = False,
    ca_cert: Annotated[
        Path | None, typer.Option(envvar="TUNESERVE_CA_CERT", help="CA of the server's certificate (TLS)")
    ] = None,
    client_cert: Annotated[Path | None, typer.Option(envvar="TUNESERVE_CLIENT_CERT", help="mTLS")] = None,
    client_key: Annotated[Path | None, typer.Option(envvar="TUNESERVE_CLIENT_KEY", help="mTLS")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per call")] = DEFAULT_TIMEOUT_S,
) -> None:
    ctx.obj = ClientConfig(address, token or None, tls, ca_cert, client_cert, client_key, timeout)


# name -> command; every command prints server errors as one line (service.cli.exits)
COMMANDS: dict[str, Callable[..., None]] = {
    "serve": local_cmds.serve,
    "health": local_cmds.health,
    "submit": jobs_cmds.submit,
    "watch": jobs_cmds.watch,
    "jobs": jobs_cmds.jobs,
    "show": jobs_cmds.show,
    "cancel": jobs_cmds.cancel,
    "tensorboard": jobs_cmds.tensorboard,
    "models": models_cmds.models,
    "describe": models_cmds.describe,
    "predict": models_cmds.predict,
    "serve-job": serving_cmds.serve_job,
    "unserve": serving_cmds.unserve,
    "set-default": serving_cmds.set_default,
    "served": serving_cmds.served,
    "export": serving_cmds.export,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(guarded(_command))


if __name__ == "__main__":
    app()
