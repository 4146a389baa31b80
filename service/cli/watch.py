"""Follow a job live: its events as they come, epoch and step bars with ETA, then a summary table.

The event stream resumes from the last sequence number seen when the connection drops (UNAVAILABLE),
with exponential backoff, so a restarting server or a flaky network loses no event and repeats none.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.protobuf import json_format
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli import exits, render, render_jobs
from service.cli.client import Client, CliError

FINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
KIND_STYLES = {
    "STATE": "bold",
    "EPOCH": "cyan",
    "CHECKPOINT": "blue",
    "EARLY_STOP": "yellow",
    "WARNING": "yellow",
    "ERROR": "red",
    "PACKAGED": "green",
    "SERVED": "bold green",
}
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")

OnRetry = Callable[[float, str, int], None]  # (delay_s, why, resuming after seq)


@dataclass
class Backoff:
    """Delays that double from `initial` to `cap`, with jitter so many clients do not retry in step."""

    initial_s: float = 0.5
    cap_s: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.initial_s * 2**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.attempt = 0


def follow_events(
    client: Client,
    job_id: str,
    after_seq: int = 0,
    *,
    on_retry: OnRetry | None = None,
    give_up_after_s: float = 300.0,
    backoff: Backoff | None = None,
) -> Iterator[pb.JobEvent]:
    """Every event of `job_id` after `after_seq`, across reconnects; ends once the job is final."""
    backoff = backoff or Backoff()
    seq, outage_since = after_seq, None
    while True:
        try:
            for event in client.stream(
                client.jobs.WatchJob, pb.WatchJobRequest(job_id=job_id, after_seq=seq)
            ):
                seq, outage_since = event.seq, None
                backoff.reset()
                yield event
            # the server ends the stream at the final state, or early when it shuts down
            if client.get_job(job_id).state in FINAL_STATES:
                return
            why = "the server ended the stream before the job finished"
        except grpc.RpcError as exc:
            call = cast(grpc.Call, exc)
            if call.code() not in RECONNECT_CODES:
                raise
            why = f"{call.code().name}: {call.details()}"
        outage_since = outage_since or time.monotonic()
        if time.monotonic() - outage_since > give_up_after_s:
            raise CliError("UNAVAILABLE", f"lost the server for over {give_up_after_s:.0f} s ({why})")
        delay = backoff.next_delay()
        if on_retry is not None:
            on_retry(delay, why, seq)
        time.sleep(delay)


@dataclass
class WatchView:
    """What the watcher shows: bars (on a terminal), one line per event, and the best epoch so far."""

    console: Console
    epochs: int
    monitor: str
    state: str = "QUEUED"
    best: tuple[int, float] | None = None  # (epoch, monitored value)
    last_epoch: dict[str, Any] = field(default_factory=dict)
    inference_url: str = ""
    progress: Progress = field(init=False)
    epoch_task: TaskID = field(init=False)
    step_task: TaskID = field(init=False)

    def __post_init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            auto_refresh=False,
        )
        self.epoch_task = self.progress.add_task("epochs", total=self.epochs, info="")
        self.step_task = self.progress.add_task("steps", total=None, info="")

    def __rich__(self) -> Group:
        return Group(self.progress, self.status_line())

    def status_line(self) -> Text:
        parts = [f"state {self.state}"]
        if self.last_epoch:
            parts.append("last epoch " + _metrics_text(self.last_epoch))
        if self.best is not None:
            parts.append(f"best {self.monitor} {render.number(self.best[1])} (epoch {self.best[0]})")
        return Text("  ·  ".join(parts), style="bold")

    def handle(self, event: pb.JobEvent) -> None:
        """Update the bars and the best-so-far, and print the event unless it is step progress."""
        data = json_format.MessageToDict(event.data)
        self.state = render.state_name(event.state)
        if event.kind == "PROGRESS":
            self._progress(data)
            return
        if event.kind == "EPOCH":
            self.last_epoch = data
            self.progress.update(self.epoch_task, completed=int(data.get("epoch", 0)))
        elif event.kind == "CHECKPOINT" and data.get("is_best"):
            self.best = (int(data.get("epoch", 0)), float(data.get("metric", float("nan"))))
        elif event.kind == "SERVED":
            self.inference_url = str(data.get("inference_url", ""))
        self.console.print(self.event_line(event, data))

    def _progress(self, data: dict[str, Any]) -> None:
        epoch, steps = int(data.get("epoch", 0)), int(data.get("steps", 0)) or None
        info = f"loss {render.number(data.get('loss', 0.0))}  lr {render.number(data.get('lr', 0.0))}"
        if "images_per_s" in data:
            info += f"  {data['images_per_s']:.0f} img/s"
        self.progress.update(
            self.step_task,
            description=f"epoch {epoch}",
            total=steps,
            completed=int(data.get("step", 0)),
            info=info,
        )

    def event_line(self, event: pb.JobEvent, data: dict[str, Any]) -> Text:
        stamp = event.time.ToDatetime(dt.UTC).astimezone().strftime("%H:%M:%S")
        message = event.message
        if event.kind == "EPOCH":
            message = f"epoch {int(data.get('epoch', 0))}/{self.epochs}  {_metrics_text(data)}"
        return Text.assemble(
            (f"{stamp} ", "dim"), (f"{event.kind:<10} ", KIND_STYLES.get(event.kind, "")), message
        )


def _metrics_text(data: dict[str, Any]) -> str:
    return "  ".join(f"{key} {render.number(data[key])}" for key in EPOCH_KEYS if key in data)


def watch_job(client: Client, job_id: str, console: Console, *, after_seq: int = 0) -> pb.Job:
    """Show the job's progress until it is final, then its summary; the final job."""
    job = client.get_job(job_id)
    view = WatchView(
        console,
        epochs=job.spec.training.epochs or 1,
        monitor=job.spec.early_stopping.monitor or "val_loss",
        state=render.state_name(job.state),
    )

    def on_retry(delay: float, why: str, seq: int) -> None:
        console.print(Text(f"connection lost ({why}); resuming after event {seq} in {delay:.1f} s", "yellow"))

    events = follow_events(client, job_id, after_seq, on_retry=on_retry)
    if console.is_terminal:
        with Live(view, console=console, refresh_per_second=4, transient=True):
            for event in events:
                view.handle(event)
    else:
        for event in events:
            view.handle(event)
    job = client.get_job(job_id)
    served = pb.ServedModel(inference_url=view.inference_url) if view.inference_url else None
    if served is None and job.result.served_model:  # the SERVED event came before `after_seq`
        served = client.served_model(job.result.served_model)
    console.print(summary_table(job, served))
    return job


def summary_table(job: pb.Job, served: pb.ServedModel | None) -> Group:
    return render_jobs.job_table(
        job, served, spec=False, heading=f"job {job.id}: {render.state_name(job.state)}"
    )


def exit_code_for(job: pb.Job) -> int:
    """0 for SUCCEEDED; the documented codes for FAILED and CANCELLED."""
    return {pb.FAILED: exits.JOB_FAILED, pb.CANCELLED: exits.JOB_CANCELLED}.get(job.state, 0)
