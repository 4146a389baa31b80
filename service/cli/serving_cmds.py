"""Serving commands: serve-job, unserve, set-default, served, export."""

from __future__ import annotations

from pathlib import Path
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


def export(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="a SUCCEEDED job")],
    to: Annotated[Path, typer.Option("--to", help="a new or empty folder (on the server's machine)")],
    kserve: Annotated[
        bool, typer.Option("--kserve", help="also write an InferenceService and a ClusterServingRuntime")
    ] = False,
    storage_uri: Annotated[
        str, typer.Option(help="with --kserve: where the folder will be (pvc://claim/path, s3://bucket/path)")
    ] = "",
    version: Annotated[str, typer.Option(help="another version of the job's model")] = "",
    auth: Annotated[str, typer.Option(help="inference authorization: token or none")] = "token",
    batch_size: Annotated[
        int | None, typer.Option(help="TorchServe's batch size (default: the job's serving.batch_size)")
    ] = None,
    max_batch_delay_ms: Annotated[int | None, typer.Option(help="default: the job's")] = None,
    workers: Annotated[int | None, typer.Option(help="workers per replica (default: the job's)")] = None,
    min_replicas: Annotated[int | None, typer.Option(help="default 1")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="default 4")] = None,
    image: Annotated[str, typer.Option(help="the image the ClusterServingRuntime runs")] = "",
) -> None:
    """Write a finished job's model as a folder plain TorchServe (and KServe) serves."""
    numbers = {
        "batch_size": batch_size,
        "max_batch_delay_ms": max_batch_delay_ms,
        "workers": workers,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
    }
    request = pb.ExportModelRequest(
        job_id=job_id,
        target_dir=str(to.absolute()),
        version=version,
        kserve=kserve,
        storage_uri=storage_uri,
        auth=auth,
        image=image,
        **{name: value for name, value in numbers.items() if value is not None},
    )
    with connect(ctx) as client:
        done = client.call(client.jobs.ExportModel, request, timeout_s=300)
    out().print(f"exported {done.model} version {done.version} to {done.path}:")
    for name in done.files:
        out().print(f"  {name}")
