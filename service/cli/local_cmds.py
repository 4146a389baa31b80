"""Commands that run something on this machine: serve (the service itself) and health."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from grpc_health.v1 import health_pb2

from service.cli.client import CliError
from service.cli.options import connect, load_settings, out
from service.errors import TuneserveError

DEFAULT_READY_PORT = 8090  # a serving replica's GET /ready (docker/k8s/serving-deployment.yaml probes it)
DEFAULT_SYNC_INTERVAL_S = 30.0  # how soon a replica serves what the control plane newly serves


def serve(
    host: Annotated[str | None, typer.Option(help="gRPC address (default: TUNESERVE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port (default: TUNESERVE_PORT, 0: any free)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
    serving_only: Annotated[
        bool,
        typer.Option(
            "--serving-only",
            help="a serving replica: TorchServe alone over the (shared) model store, registering the "
            "models found there; no training, no job API, no scheduler",
        ),
    ] = False,
    ready_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="--serving-only: GET /ready here answers 200 once TorchServe is healthy with every model "
            "loaded (0: no readiness endpoint)",
        ),
    ] = DEFAULT_READY_PORT,
    sync_interval: Annotated[
        float,
        typer.Option(
            min=0,
            help="--serving-only: look at the model store's served versions this often (seconds) and "
            "serve what changed (0: only what is there at start)",
        ),
    ] = DEFAULT_SYNC_INTERVAL_S,
    model_store: Annotated[
        Path | None,
        typer.Option(
            help="the model store (default: TUNESERVE_MODEL_STORE_DIR, else <state dir>/model_store)"
        ),
    ] = None,
) -> None:
    """Run the service (gRPC API, scheduler, TorchServe) in the foreground until SIGTERM or Ctrl-C; with
    --serving-only, TorchServe alone."""
    configure_logging(log_level)
    given = {"host": host, "port": port, "model_store_dir": model_store}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    settings = load_settings(**overrides)
    try:
        if serving_only:
            if host is not None or port is not None:
                raise CliError(
                    "INVALID_ARGUMENT", "--host/--port set the job API, which --serving-only does not run"
                )
            from service.packaging.serving_only import run_serving_only  # deferred: as below

            run_serving_only(settings, ready_port=ready_port or None, sync_interval_s=sync_interval)
            return
        from service.app import run_service  # deferred: the client commands must start fast

        run_service(settings)
    except TuneserveError as exc:  # start-up problems the operator can fix (ports, TorchServe, folders)
        raise CliError(exc.code, exc.message) from None


def configure_logging(level: str) -> None:
    """Readable logs: rich's handler on a terminal, one plain timestamped line per record otherwise."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise CliError("INVALID_ARGUMENT", f"--log-level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="%H:%M:%S"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)


def health(
    ctx: typer.Context,
    wait: Annotated[float, typer.Option(help="wait up to this many seconds for SERVING")] = 0.0,
) -> None:
    """Every name the server's health service publishes, with its status; exit 6 when the server is not
    SERVING."""
    with connect(ctx) as client:
        if wait:
            client.wait_until_serving(wait)
        published = client.health_statuses()
    # the server first, then tuneserve's services, torchserve and each torchserve/<model>
    statuses = {(name or "(server)"): published[name] for name in sorted(published)}
    width = max(24, *map(len, statuses))
    console = out()
    for name, status in statuses.items():
        console.print(f"{name:<{width}} {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    if statuses.get("(server)") != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(6)
