"""Rich tables for jobs: the list, and everything about one job (the CLI's `jobs` and `watch`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli.render import format_seconds, how_to_call, number, state_text, titled, when


def jobs_table(jobs: Iterable[pb.Job]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "name", "state", "architecture", "epochs", "best", "created", "duration"):
        table.add_column(column, no_wrap=column in ("id", "state", "created"))
    for job in jobs:
        epochs = job.spec.training.epochs
        done = job.result.epochs_completed
        table.add_row(
            job.id, job.spec.name, state_text(job.state), job.spec.model.architecture,
            f"{done}/{epochs}" if epochs else str(done), best_text(job.result), when(job.created_at),
            duration(job),
        )  # fmt: skip
    return table


def job_table(
    job: pb.Job, served: pb.ServedModel | None = None, *, spec: bool = True, heading: str | None = None
) -> Group:
    """Everything about one job: state, timing, the spec's essentials, the result and where it lies."""
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str | Text]] = [("name", job.spec.name), ("state", state_text(job.state))]
    if job.owner:  # "" without authentication; an admin sees whose job it is
        rows.append(("owner", job.owner))
    if job.error:
        rows.append(("error", Text(job.error, style="red")))
    if job.cancel_requested and job.state not in (pb.CANCELLED, pb.FAILED, pb.SUCCEEDED):
        rows.append(("cancel", "requested"))
    if spec:
        rows += _spec_rows(job.spec)
        rows += [("created", when(job.created_at)), ("started", when(job.started_at))]
        rows += [("finished", when(job.finished_at)), ("duration", duration(job))]
        if job.attempts > 1:
            rows.append(("attempts", str(job.attempts)))
        if job.idempotency_key:
            rows.append(("idempotency key", job.idempotency_key))
    rows += _result_rows(job.result)
    rows += _serving_rows(job, served)
    for name, value in rows:
        table.add_row(name, value)
    return titled(heading or f"job {job.id}", table)


def _spec_rows(spec: pb.JobSpec) -> list[tuple[str, str | Text]]:
    freeze = spec.freeze
    frozen = (
        f"until {freeze.until_layer}" if freeze.until_layer
        else f"depth {freeze.depth}" if freeze.HasField("depth") else "nothing"
    )  # fmt: skip
    training = spec.training
    return [
        ("model", f"{spec.model.architecture} (weights {spec.model.weights or 'DEFAULT'})"),
        ("data", spec.data.path + (f" (val {spec.data.val_path})" if spec.data.val_path else "")),
        ("task", spec.task or "multiclass"),
        ("freeze", frozen),
        (
            "training",
            f"{training.epochs} epochs, batch {training.batch_size}, {training.optimizer} lr "
            f"{number(training.lr)}, image {training.image_size or 'default'} px",
        ),
    ]


def _result_rows(result: pb.JobResult) -> list[tuple[str, str | Text]]:
    rows: list[tuple[str, str | Text]] = []
    if result.device:
        rows.append(("device", result.device))
    if result.epochs_completed:
        stop = f" ({result.stop_reason})" if result.stop_reason else ""
        rows.append(("epochs completed", f"{result.epochs_completed}{stop}"))
    if result.monitor:
        rows.append(("best epoch", str(result.best_epoch)))
        rows.append((f"best {result.monitor}", number(result.best_metric)))
    for key in sorted(result.metrics):
        if key not in ("epoch", "steps"):
            rows.append((f"  {key}", number(result.metrics[key])))
    if result.class_names:
        rows.append(("classes", ", ".join(result.class_names)))
    if result.gate_sample:
        rows.append(("gate sample", f"{len(result.gate_sample)} validation images"))
    paths = [
        ("checkpoint", result.best_checkpoint),
        ("checkpoints", result.checkpoint_dir),
        ("tensorboard", result.tensorboard_dir),
        ("wandb", result.wandb_dir + (f" (run {result.wandb_run_id})" if result.wandb_run_id else "")),
        ("archive", result.archive_path),
        ("archive sha256", result.archive_sha256),
    ]
    rows += [(name, value) for name, value in paths if value]
    return rows


def _serving_rows(job: pb.Job, served: pb.ServedModel | None) -> list[tuple[str, str | Text]]:
    result = job.result
    if not result.served_model:
        return []
    url = served.inference_url if served and served.inference_url else ""
    return [
        ("served", Text(f"{result.served_model} version {result.served_version}", style="green")),
        *how_to_call(result.served_model, result.served_version, url),
    ]


def duration(job: pb.Job) -> str:
    if not job.HasField("started_at"):
        return "-"
    end = job.finished_at if job.HasField("finished_at") else None
    seconds = (end.ToSeconds() if end else dt.datetime.now(dt.UTC).timestamp()) - job.started_at.ToSeconds()
    return format_seconds(seconds)


def best_text(result: pb.JobResult) -> str:
    if not result.monitor:
        return "-"
    return f"{result.monitor} {number(result.best_metric)} (epoch {result.best_epoch})"
