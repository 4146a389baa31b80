"""Serving commands: serve-job, unserve, set-default, served."""

from __future__ import annotations

from typing import Annotated

import typer

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli import render
from service.cli.options import connect, out

ModelName = Annotated[str, typer.Argument(help="served model name")]


def serve_job(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="a SUCCEEDED job")]) -> None:
    """(Re)serve a finished job's archive with TorchServe as a new version of its model."""
    with connect(ctx) as client:
        served = client.call(client.jobs.ServeJob, pb.ServeJobRequest(job_id=job_id), timeout_s=600)
    out().print(render.served_line(served))


def unserve(
    ctx: typer.Context,
    model: ModelName,
    version: Annotated[str, typer.Option(help="one version (default: every version)")] = "",
) -> None:
    """Stop serving a model version, or the whole model."""
    with connect(ctx) as client:
        client.call(client.jobs.UnserveModel, pb.UnserveModelRequest(name=model, version=version))
    out().print(f"unserved {model}" + (f" version {version}" if version else " (every version)"))


def set_default(
    ctx: typer.Context, model: ModelName, version: Annotated[str, typer.Argument(help="the version")]
) -> None:
    """Make VERSION the one `predict` and /predictions/MODEL answer with."""
    with connect(ctx) as client:
        served = client.call(
            client.jobs.SetDefaultVersion, pb.SetDefaultVersionRequest(name=model, version=version)
        )
    out().print(render.served_line(served))


def served(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the proto's JSON instead of a table")
    ] = False,
) -> None:
    """Models TorchServe serves now, with their versions and inference URLs."""
    with connect(ctx) as client:
        answer = client.call(client.jobs.ListServedModels, pb.ListServedModelsRequest())
    if as_json:
        render.print_json(answer)
    elif answer.models:
        out().print(render.served_table(answer.models))
    else:
        out().print("no models are served")
