"""A real tuneserve service on loopback for the API tests: settings, tiny datasets, specs, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service, start_service
from service.settings import Settings

T = TypeVar("T")
COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))
FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings for one test service: everything under `root`, port 0, no TorchServe, one job at a time."""
    values: dict[str, Any] = {
        "state_dir": root / "state",
        "data_root": root / "data",
        "torch_home": root / "torch",
        "host": "127.0.0.1",
        "port": 0,
        "torchserve_enabled": False,
        "max_concurrent_jobs": 1,
        "cancel_grace_s": 10.0,
        "drain_grace_s": 20.0,
        "grpc_workers": 8,
    }
    values.update(overrides)
    return Settings(**values)


def make_image_folder(folder: Path, classes: int = 2, per_class: int = 4, size: int = 32) -> Path:
    """folder/class_<i>/<j>.png, each class its own colour."""
    for c in range(classes):
        for j in range(per_class):
            rng = np.random.default_rng(c * 100 + j)
            pixels = np.clip(rng.normal(0, 25, (size, size, 3)) + np.array(COLOURS[c % 3]), 0, 255)
            path = folder / f"class_{c}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    return folder


def spec(name: str = "tiny", **sections: Any) -> pb.JobSpec:
    """A job that trains in seconds: mobilenet_v3_small, random init, 32 px, no loggers, not served.

    Keyword arguments override a section's fields (`training={"epochs": 3}`) or a top-level field (`task=`).
    """
    base: dict[str, Any] = {
        "model": {"architecture": "mobilenet_v3_small", "weights": "none"},
        "data": {"path": "ds", "val_fraction": 0.25},
        "training": {"epochs": 1, "batch_size": 4, "image_size": 32, "augmentation": "none", "device": "cpu"},
        "early_stopping": {"enabled": False},
        "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
        "serving": {"enabled": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    message = pb.JobSpec(name=name)
    _fill(message, base)
    return message


def _fill(message: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _fill(getattr(message, key), value)
        elif isinstance(value, list):
            getattr(message, key).extend(value)
        else:
            setattr(message, key, value)


@contextmanager
def running_service(settings: Settings, serving: Any = None) -> Iterator[Service]:
    service = start_service(settings, serving)
    try:
        yield service
    finally:
        service.stop(drain=False)


@contextmanager
def channel_to(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield channel


def stub(channel: grpc.Channel) -> pb_grpc.FineTuningStub:
    return pb_grpc.FineTuningStub(channel)


def wait_for(check: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_state(
    client: pb_grpc.FineTuningStub, job_id: str, states: tuple[int, ...], timeout: float = 90.0
) -> pb.Job:
    def check() -> pb.Job | None:
        job = client.GetJob(pb.GetJobRequest(job_id=job_id))
        return job if job.state in states else None

    names = "/".join(pb.JobState.Name(s) for s in states)
    return wait_for(check, timeout, f"job {job_id} to be {names}")


def wait_event(client: pb_grpc.FineTuningStub, job_id: str, kind: str, timeout: float = 90.0) -> pb.JobEvent:
    """The first event of `kind` (read by re-watching from the start; the watch ends at a final state)."""

    def check() -> pb.JobEvent | None:
        stream = client.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=1.0)
        try:
            for event in stream:
                if event.kind == kind:
                    return event
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        return None

    return wait_for(check, timeout, f"a {kind} event of job {job_id}")


def all_events(client: pb_grpc.FineTuningStub, job_id: str, after_seq: int = 0) -> list[pb.JobEvent]:
    """Every event of a job in a final state (the stream ends by itself)."""
    return list(client.WatchJob(pb.WatchJobRequest(job_id=job_id, after_seq=after_seq), timeout=30))
