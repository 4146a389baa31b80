"""Job commands: submit, watch, jobs, show, cancel, tensorboard."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, cast

import typer
import yaml
from google.protobuf import json_format

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli import exits, render, render_jobs, specfile
from service.cli.client import Client, CliError
from service.cli.options import connect, err, load_settings, out
from service.cli.watch import exit_code_for, watch_job

STATE_NAMES = [name for name in pb.JobState.DESCRIPTOR.values_by_name if name != "JOB_STATE_UNSPECIFIED"]

JobId = Annotated[str, typer.Argument(help="the job id (see `tuneserve jobs`)")]
AsJson = Annotated[bool, typer.Option("--json", help="print the proto's JSON instead of a table")]


def submit(
    ctx: typer.Context,
    spec_file: Annotated[Path | None, typer.Argument(help="a YAML or JSON job spec")] = None,
    name: Annotated[str | None, typer.Option(help="job name (letters, digits, _ and -)")] = None,
    arch: Annotated[str | None, typer.Option(help="architecture, e.g. resnet18, timm/convnext_atto")] = None,
    weights: Annotated[str | None, typer.Option(help="DEFAULT, a weights name, or none")] = None,
    data: Annotated[str | None, typer.Option(help="ImageFolder path under the data root")] = None,
    val_path: Annotated[str | None, typer.Option(help="separate validation folder")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, sgd, adam or rmsprop")] = None,
    freeze_depth: Annotated[int | None, typer.Option(help="freeze the first N blocks")] = None,
    freeze_until: Annotated[str | None, typer.Option(help="freeze up to and including this block")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="cap on steps per epoch")] = None,
    serve: Annotated[bool | None, typer.Option("--serve/--no-serve", help="serve the result")] = None,
    model_name: Annotated[str | None, typer.Option(help="served model name (default: the job name)")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="PATH=VALUE", help="override any spec field: --set training.lr=0.01"),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="resubmitting with it returns the same job")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow the job until it ends")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the job id")] = False,
) -> None:
    """Submit a fine-tune job from a spec file and/or flags; prints the job id."""
    raw = specfile.load_spec_file(spec_file) if spec_file else {}
    if freeze_depth is not None or freeze_until is not None:  # a flag replaces the file's way to freeze
        raw.setdefault("freeze", {}).pop("depth" if freeze_until is not None else "until_layer", None)
    flags: dict[str, Any] = {
        "name": name, "model.architecture": arch, "model.weights": weights, "data.path": data,
        "data.val_path": val_path, "training.epochs": epochs, "training.batch_size": batch_size,
        "training.image_size": image_size, "training.lr": lr, "training.optimizer": optimizer,
        "freeze.depth": freeze_depth, "freeze.until_layer": freeze_until, "training.device": device,
        "training.max_steps_per_epoch": max_steps_per_epoch, "serving.enabled": serve,
        "serving.model_name": model_name,
    }  # fmt: skip
    merged = specfile.apply_overrides(raw, {**flags, **specfile.parse_set_options(set_ or [])})
    request = pb.CreateJobRequest(spec=specfile.spec_to_proto(merged), idempotency_key=idempotency_key or "")
    with connect(ctx) as client:
        job = client.call(client.jobs.CreateJob, request)
        if quiet:
            typer.echo(job.id)
        else:
            out().print(f"submitted job {job.id} ({job.spec.name}, {render.state_name(job.state)})")
        if watch:
            _watch(client, job.id)


def watch(
    ctx: typer.Context,
    job_id: JobId,
    after_seq: Annotated[int, typer.Option(help="start after this event number")] = 0,
) -> None:
    """Live progress of a job until it ends, then its summary. Exit 8 if it FAILED, 9 if CANCELLED."""
    with connect(ctx) as client:
        _watch(client, job_id, after_seq)


def _watch(client: Client, job_id: str, after_seq: int = 0) -> None:
    try:
        job = watch_job(client, job_id, out(), after_seq=after_seq)
    except KeyboardInterrupt:
        err().print(
            f"stopped watching; job {job_id} keeps running (tuneserve watch / tuneserve cancel {job_id})"
        )
        raise typer.Exit(exits.INTERRUPTED) from None
    code = exit_code_for(job)
    if code:
        raise typer.Exit(code)


def jobs(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None, typer.Option("--state", "-s", help=f"only these states: {', '.join(STATE_NAMES)}")
    ] = None,
    limit: Annotated[int, typer.Option(help="jobs per page (at most 500)")] = 20,
    page_token: Annotated[str, typer.Option(help="continue from a previous page")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="every page")] = False,
    as_json: AsJson = False,
) -> None:
    """Jobs, newest first."""
    states = [_state(s) for s in state or []]
    found: list[pb.Job] = []
    with connect(ctx) as client:
        while True:
            request = pb.ListJobsRequest(page_size=limit, page_token=page_token, states=states)
            answer = client.call(client.jobs.ListJobs, request)
            found += answer.jobs
            page_token = answer.next_page_token
            if not (all_pages and page_token):
                break
    if as_json:
        render.print_json(pb.ListJobsResponse(jobs=found, next_page_token=page_token))
        return
    console = out()
    if not found:
        console.print("no jobs" + (f" in state {', '.join(state or [])}" if state else ""))
        return
    console.print(render_jobs.jobs_table(found))
    if page_token:
        console.print(f"more: tuneserve jobs --limit {limit} --page-token {page_token}", style="dim")


def _state(name: str) -> pb.JobState:
    if name.upper() not in STATE_NAMES:
        raise CliError(
            "INVALID_ARGUMENT", f"--state {name!r} is not a job state; use {', '.join(STATE_NAMES)}"
        )
    return cast(pb.JobState, pb.JobState.Value(name.upper()))


def show(
    ctx: typer.Context,
    job_id: JobId,
    as_json: AsJson = False,
    spec: Annotated[bool, typer.Option("--spec", help="also print the job's full spec as YAML")] = False,
) -> None:
    """A job's details: state, spec essentials, metrics, and where its checkpoints, logs and archive are."""
    with connect(ctx) as client:
        job = client.get_job(job_id)
        served = client.served_model(job.result.served_model) if job.result.served_model else None
    if as_json:
        render.print_json(job)
        return
    console = out()
    console.print(render_jobs.job_table(job, served))
    if spec:
        data = json_format.MessageToDict(job.spec, preserving_proto_field_name=True)
        console.print(yaml.safe_dump(data, sort_keys=False).rstrip())


def cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Cancel a job: a queued job at once, a running one at its next safe point."""
    with connect(ctx) as client:
        job = client.call(client.jobs.CancelJob, pb.CancelJobRequest(job_id=job_id))
    state = render.state_name(job.state)
    if job.state == pb.CANCELLED:
        out().print(f"job {job.id}: CANCELLED")
    elif job.state in (pb.SUCCEEDED, pb.FAILED):
        out().print(f"job {job.id} had already ended ({state})")
    else:
        out().print(f"job {job.id}: cancel requested ({state}); it stops at its next safe point")


def tensorboard(
    ctx: typer.Context,
    job_id: JobId,
    host: Annotated[
        str | None,
        typer.Option(help="address TensorBoard listens on (default: TUNESERVE_TENSORBOARD_HOST, 127.0.0.1)"),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="port TensorBoard listens on")] = 6006,
) -> None:
    """Start TensorBoard on a job's logs (on this machine) and print its URL; Ctrl-C stops it."""
    host = host or load_settings().tensorboard_host  # TUNESERVE_TENSORBOARD_HOST
    with connect(ctx) as client:
        job = client.get_job(job_id)
    logdir = job.result.tensorboard_dir
    if not logdir:
        raise CliError(
            "FAILED_PRECONDITION",
            f"job {job_id} has no TensorBoard logs (it has not trained yet, or logging.tensorboard is off)",
        )
    if not Path(logdir).is_dir():
        raise CliError(
            "NOT_FOUND",
            f"{logdir} is not on this machine; run TensorBoard where the service runs: "
            f"tensorboard --logdir {logdir}",
        )
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        logdir,
        "--host",
        host,
        "--port",
        str(port),
    ]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads it while TensorBoard runs
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        everywhere = " (all interfaces: use this machine's address)" if host in ("0.0.0.0", "::") else ""
        out().print(
            f"TensorBoard for job {job_id} ({logdir}): http://{host}:{port}/{everywhere}  (Ctrl-C stops it)"
        )
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated CLI takes TensorBoard with it
        try:
            code = process.wait()
        except KeyboardInterrupt:
            return
        finally:
            signal.signal(signal.SIGTERM, previous)
            if process.poll() is None:
                process.terminate()
                process.wait(10)
        if code:
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])
            raise CliError("UNKNOWN", f"TensorBoard exited with {code}: {tail}")


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt
