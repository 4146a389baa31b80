"""Benchmark: what reporting through the internal gRPC API costs a worker.

  python -m bench.reporting [--quick]

(a) events per second one worker's GrpcReporter delivers through the real loopback reporting server into
    a real job store (SQLite, WAL), event() to the last one stored; the baseline in the same run: the old
    path, one store transaction per event, as the worker wrote them before.
(b) the demo job's epoch (examples/digits-efficientnet-lite0.yaml: Lite0 on scikit-learn's digits, on a
    subset of them) with the gRPC reporter against a reporter that does nothing, in the same process,
    interleaved; `ratio` = off / on epoch time (1.0: reporting costs nothing; the goal is >= 0.99).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import emit, ratio

NAME = "reporting"
SPEC = Path(__file__).resolve().parents[1] / "examples" / "digits-efficientnet-lite0.yaml"
PROGRESS = {"epoch": 1, "step": 10, "steps": 100, "loss": 0.6931, "lr": 0.003, "images_per_s": 321.5}


@dataclass(frozen=True)
class Size:
    events: int
    per_class: int  # digits per class (about 178 in all)
    repeats: int  # epochs measured per reporter, interleaved


QUICK = Size(events=2_000, per_class=10, repeats=2)
FULL = Size(events=20_000, per_class=60, repeats=5)


def run(size: Size) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-reporting-") as tmp:
        events = events_per_second(Path(tmp) / "events", size.events)
        epochs = epoch_with_and_without_reporting(Path(tmp) / "epochs", size)
    return {"benchmark": NAME, **events, **epochs}


# ---------------------------------------------------------------------------------- (a) events


def events_per_second(root: Path, count: int) -> dict[str, Any]:
    from service.jobs.store import JobStore
    from service.records import EventKind

    with _control_plane(root) as (db, reporter_for, stored):
        reporter = reporter_for("events")
        started = time.perf_counter()
        for i in range(count):
            reporter.event(EventKind.PROGRESS, f"epoch 1 step {i}", PROGRESS)
        queued = time.perf_counter() - started
        reporter.close()  # flushes: every event is in the store when it returns
        delivered = time.perf_counter() - started
        assert stored(reporter.job_id) == count + 2  # and the job's queued and running events
        direct = JobStore(db)  # the old path: the worker's own connection, a transaction per event
        direct_id = _running_job(direct, "direct")
        started = time.perf_counter()
        for i in range(count):
            direct.append_event(direct_id, EventKind.PROGRESS, f"epoch 1 step {i}", PROGRESS)
        one_by_one = time.perf_counter() - started
        direct.close()
    return {
        "events": count,
        "grpc_events_per_s": round(count / delivered),
        "event_call_us": round(1e6 * queued / count, 2),  # what a training step waits for: the enqueue
        "store_per_event_events_per_s": round(count / one_by_one),
        "grpc_vs_store_per_event": round(ratio(one_by_one, delivered), 2),
    }


# ---------------------------------------------------------------------------------- (b) epochs


class _NoReporter:
    """Reports nothing: the 'off' side."""

    def event(self, kind: Any, message: str, data: dict[str, Any] | None = None) -> None:
        pass

    def result(self, **fields: Any) -> None:
        pass

    def stop_requested(self) -> str | None:
        return None


class _EpochTime:
    """Passes everything on and keeps the EPOCH event's epoch_time_s (the runner's own clock)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds: float | None = None

    def event(self, kind: Any, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "EPOCH" and data:
            self.seconds = float(data["epoch_time_s"])
        self.inner.event(kind, message, data)

    def result(self, **fields: Any) -> None:
        self.inner.result(**fields)

    def stop_requested(self) -> str | None:
        return self.inner.stop_requested()  # type: ignore[no-any-return]


def epoch_with_and_without_reporting(root: Path, size: Size) -> dict[str, Any]:
    from service.settings import Settings
    from service.spec import JobSpec
    from service.training.runner import train

    data_root = root / "data"
    _write_digits(data_root / "digits", size.per_class)
    settings = Settings(state_dir=root / "state", data_root=data_root)  # type: ignore[call-arg]
    spec = JobSpec.model_validate(_demo_spec(size))
    times: dict[str, list[float]] = {"off": [], "on": []}
    with _control_plane(root / "plane") as (_, reporter_for, _count):
        for repeat in range(size.repeats + 1):  # the first pair warms caches and is not counted
            for side in ("off", "on"):
                inner = reporter_for(f"{side}-{repeat}") if side == "on" else _NoReporter()
                timed = _EpochTime(inner)
                train(spec, root / "jobs" / f"{side}-{repeat}", settings, timed)  # a fresh folder: no resume
                if side == "on":
                    inner.close()
                if repeat > 0 and timed.seconds is not None:
                    times[side].append(timed.seconds)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {
        "demo_subset": f"{size.per_class} digits per class, 1 epoch, {spec.training.image_size} px",
        "epoch_s_reporting_off": round(off, 3),
        "epoch_s_reporting_on": round(on, 3),
        "epoch_s_all": {side: [round(t, 3) for t in values] for side, values in times.items()},
        "ratio": round(ratio(off, on), 4),
    }


def _demo_spec(size: Size) -> dict[str, Any]:
    from service.cli.specfile import load_spec_file

    data = load_spec_file(SPEC)
    data["training"] = {**data["training"], "epochs": 1, "device": "cpu"}
    data["early_stopping"] = {"enabled": False}
    data["logging"] = {"tensorboard": False, "wandb": {"mode": "disabled"}}  # the reporter is the variable
    data["serving"] = {**data["serving"], "enabled": False}
    return data


def _write_digits(folder: Path, per_class: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    seen: dict[int, int] = {}
    for index, label in enumerate(digits.target):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > per_class:
            continue
        gray = Image.fromarray((digits.images[index] * (255 / 16)).astype(np.uint8), mode="L")
        path = folder / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        gray.resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(path)


# ---------------------------------------------------------------------------------- the control plane


class _control_plane:
    """A real store, intake and loopback reporting server in a process of their own, as in the service;
    yields (the store's path, a reporter for a new RUNNING job, the number of events a job has)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> tuple[Path, Any, Any]:
        from service.api.report_client import GrpcReporter

        context = multiprocessing.get_context("spawn")  # nothing of this process's torch state
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(str(self.root), child), daemon=True)
        self.process.start()
        address = self.conn.recv()

        def reporter_for(name: str) -> Any:
            self.conn.send(("job", name))
            job_id, token = self.conn.recv()
            return GrpcReporter(address, token, job_id).start()

        def count(job_id: str) -> int:
            self.conn.send(("count", job_id))
            return int(self.conn.recv())

        return self.root / "jobs.sqlite3", reporter_for, count

    def __exit__(self, *exc: object) -> None:
        self.conn.send(("stop", ""))
        self.process.join(timeout=30)


def _serve(root: str, conn: Any) -> None:
    from service.api.reporting_server import start_reporting_server
    from service.jobs.intake import Intake
    from service.jobs.store import JobStore
    from service.settings import Settings

    settings = Settings(state_dir=Path(root))  # type: ignore[call-arg]
    store = JobStore(settings.jobs_db)
    intake = Intake(store)
    server = start_reporting_server(settings, intake)
    conn.send(server.address)
    while True:
        command, argument = conn.recv()
        if command == "job":
            job_id = _running_job(store, argument)
            conn.send((job_id, intake.issue(job_id)))
        elif command == "count":
            conn.send(len(store.events_after(argument, limit=10**9)))
        else:
            break
    server.stop(0)
    store.close()


def _running_job(store: Any, name: str) -> str:
    from service.records import JobState
    from service.spec import JobSpec

    spec = JobSpec.model_validate(
        {"name": name, "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
    )
    job_id = str(store.create_job(spec).id)
    store.transition(job_id, JobState.RUNNING)
    return job_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else FULL))


if __name__ == "__main__":
    main()
