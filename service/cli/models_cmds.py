"""Model commands: models, describe (the layer table and what a freeze request freezes), predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli import render
from service.cli.client import CliError
from service.cli.options import connect, out

AsJson = Annotated[bool, typer.Option("--json", help="print the proto's JSON instead of a table")]


def models(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(help="torchvision, timm or builtin (default: all)")] = "",
    available: Annotated[
        bool, typer.Option("--available", help="only those with weights on the server")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Architectures that can be fine-tuned, and whether their pretrained weights are on the server."""
    with connect(ctx) as client:
        answer = client.call(
            client.jobs.ListModels, pb.ListModelsRequest(source=source, available_only=available)
        )
    if as_json:
        render.print_json(answer)
    elif answer.models:
        out().print(render.models_table(answer.models))
    else:
        out().print("no models" + (" with weights on the server" if available else ""))


def describe(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="architecture, e.g. resnet18 or tf_efficientnet_lite0")],
    freeze_depth: Annotated[int | None, typer.Option(help="mark the first N blocks frozen")] = None,
    freeze_until: Annotated[str | None, typer.Option(help="mark blocks up to this one frozen")] = None,
    image_size: Annotated[int, typer.Option(help="input size (default: the weights')")] = 0,
    num_classes: Annotated[int, typer.Option(help="head size (default: the pretrained head's)")] = 0,
    as_json: AsJson = False,
) -> None:
    """The layer table of an architecture: blocks, output shapes, parameters, and which a freeze freezes."""
    freeze = pb.FreezeSpec(until_layer=freeze_until or "")
    if freeze_depth is not None:
        freeze.depth = freeze_depth
    request = pb.DescribeModelRequest(
        architecture=model, image_size=image_size, num_classes=num_classes, freeze=freeze
    )
    with connect(ctx) as client:
        description = client.call(client.jobs.DescribeModel, request)
    if as_json:
        render.print_json(description)
    else:
        out().print(render.layers_table(description))


def predict(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="served model name (see `tuneserve served`)")],
    images: Annotated[list[Path], typer.Argument(help="JPEG or PNG files")],
    top_k: Annotated[int, typer.Option(help="classes per image (default: the model's)")] = 0,
    version: Annotated[str, typer.Option(help="model version (default: the default version)")] = "",
    as_json: AsJson = False,
) -> None:
    """Classify images with a served model: a top-k table per image."""
    request = pb.PredictRequest(model=model, version=version, top_k=top_k, images=[_read(p) for p in images])
    with connect(ctx) as client:
        answer = client.call(client.inference.Predict, request)
    if as_json:
        render.print_json(answer)
        return
    console = out()
    console.print(f"{answer.model} version {answer.version or 'default'}")
    for path, prediction in zip(images, answer.predictions, strict=False):
        console.print(render.predictions_table(str(path), prediction))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError("INVALID_ARGUMENT", f"image {path}: {exc.strerror or exc}") from None
