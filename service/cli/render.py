"""Rich output for what the server answers: the console, JSON, formatting, and the model and serving
tables (a job's tables: service.cli.render_jobs). Server text is never read as markup (markup=False)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb

STATE_STYLES = {
    "QUEUED": "yellow",
    "RUNNING": "cyan",
    "PACKAGING": "cyan",
    "SUCCEEDED": "green",
    "FAILED": "red",
    "CANCELLED": "magenta",
}
INFERENCE_KEY_HINT = "the inference key is in the server's $TUNESERVE_STATE_DIR/torchserve/key_file.json"


LOG_WIDTH = 160  # lines written to a file or pipe are not wrapped at 80 columns


def make_console(stderr: bool = False) -> Console:
    """A console that never interprets server text as markup or emoji codes."""
    console = Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


def print_json(message: Message | list[Message]) -> None:
    """Machine-readable output: the proto's JSON mapping with proto field names."""
    if isinstance(message, list):
        data: Any = [_to_dict(m) for m in message]
    else:
        data = _to_dict(message)
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# ------------------------------------------------------------------------------------- formatting


def state_name(state: int) -> str:
    return pb.JobState.Name(state) if state in pb.JobState.values() else str(state)


def state_text(state: int) -> Text:
    name = state_name(state)
    return Text(name, style=STATE_STYLES.get(name, ""))


def when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def number(value: float | int) -> str:
    """Metrics and learning rates: 4 significant digits, scientific when tiny."""
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1):
        return f"{int(value):,}"
    return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


def params(count: int) -> str:
    return f"{count:,}"


def titled(heading: str, table: Table) -> Group:
    """A heading that never wraps (a table's own title wraps at the table's width), then the table."""
    return Group(Text(heading, style="bold", no_wrap=True, overflow="ignore"), table)


# ------------------------------------------------------------------------------------ models


def models_table(models: Iterable[pb.ModelInfo]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("architecture", "source", "default weights", "here", "other weights", "how to fetch"):
        table.add_column(column, overflow="fold")
    for model in models:
        default = next((w for w in model.weights if w.is_default), None)
        others = [w.name + (" (here)" if w.available else "") for w in model.weights if w is not default]
        here = Text("yes", style="green") if default and default.available else Text("no", style="dim")
        fetch = default.fetch_command if default and not default.available else ""
        table.add_row(
            model.architecture, model.source, default.name if default else "-", here, ", ".join(others), fetch
        )
    return table


def layers_table(description: pb.ModelDescription) -> Group:
    """The layer table with frozen rows marked, then the parameter totals."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("state")
    for row in description.layers:
        state = Text("frozen", style="cyan") if row.frozen else Text("head" if row.is_head else "trainable")
        shape = "x".join(str(d) for d in row.output_shape) if row.output_shape else "-"
        table.add_row(
            str(row.index), row.name, row.type, shape, params(row.params), state,
            style="dim" if row.frozen else None,
        )  # fmt: skip
    totals = Text(
        f"total params {params(description.total_params)}  trainable {params(description.trainable_params)}  "
        f"frozen {params(description.frozen_params)}  (freeze depths 0..{description.freezable_blocks})"
    )
    return Group(titled(f"{description.architecture} at {description.image_size} px", table), totals)


def predictions_table(image: str, prediction: pb.Prediction) -> Group:
    """The image's name (never wrapped: it is a path to copy), then its top-k classes."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("rank", justify="right")
    table.add_column("label")
    table.add_column("probability", justify="right")
    if prediction.error:
        table.add_row("-", Text(f"error: {prediction.error}", style="red"), "-")
    for rank, score in enumerate(prediction.scores, start=1):
        table.add_row(str(rank), score.label, f"{score.probability:.4f}")
    return titled(image, table)


# ------------------------------------------------------------------------------------ serving


def how_to_call(model: str, version: str, inference_url: str) -> list[tuple[str, str | Text]]:
    """Rows that show how to ask the served model: TorchServe REST (curl) and `tuneserve predict`."""
    url = predictions_url(model, version, inference_url)
    curl = f'curl -H "Authorization: Bearer $INFERENCE_KEY" -T IMAGE.png {url}'
    return [
        ("call (REST)", curl),
        ("", Text(INFERENCE_KEY_HINT, style="dim")),
        ("call (CLI)", f"tuneserve predict {model} IMAGE.png --version {version}"),
    ]


def predictions_url(model: str, version: str, inference_url: str) -> str:
    """TorchServe's REST URL for `model` (and `version`); the server reports `<base>/predictions/<model>`."""
    url = (inference_url or "http://127.0.0.1:8080").rstrip("/")
    if "/predictions/" not in url:
        url = f"{url}/predictions/{model}"
    return f"{url}/{version}" if version and not url.endswith(f"/{version}") else url


def served_table(models: Iterable[pb.ServedModel]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("model", "default", "versions", "ready", "job", "inference url"):
        table.add_column(column, overflow="fold")
    for model in models:
        ready = Text("yes", style="green") if model.ready else Text("no", style="yellow")
        table.add_row(
            model.name, model.version, ", ".join(model.versions) or model.version, ready, model.job_id,
            predictions_url(model.name, "", model.inference_url),
        )  # fmt: skip
    return table


def served_line(model: pb.ServedModel) -> Text:
    default = " (default)" if model.is_default else ""
    ready = "ready" if model.ready else "not ready yet"
    return Text(f"{model.name} version {model.version}{default}: {ready}; {model.inference_url}")
