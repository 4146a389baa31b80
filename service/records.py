"""What the service remembers about a job: its state, its result, and its ordered events."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from service.spec import JobSpec


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PACKAGING = "PACKAGING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class EventKind(enum.StrEnum):
    STATE = "STATE"  # data: {"state": ..., "reason": ...}
    EPOCH = "EPOCH"  # data: {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", ...}
    PROGRESS = "PROGRESS"  # data: {"epoch", "step", "steps", "loss", "lr", "images_per_s"}
    CHECKPOINT = "CHECKPOINT"  # data: {"epoch", "path", "is_best", "metric"}
    EARLY_STOP = "EARLY_STOP"  # data: {"epoch", "monitor", "best", "patience"}
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    PACKAGED = "PACKAGED"  # data: {"archive", "sha256"}
    SERVED = "SERVED"  # data: {"model", "version", "inference_url"}


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    seq: int  # 1, 2, 3 ... per job, never reused: clients resume a watch from a seq
    time: float
    kind: EventKind
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    """Filled in as the job progresses; every field is optional until the job ends."""

    device: str | None = None
    best_epoch: int | None = None
    best_metric: float | None = None
    monitor: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epochs_completed: int = 0
    stop_reason: str | None = None
    checkpoint_dir: str | None = None
    best_checkpoint: str | None = None
    tensorboard_dir: str | None = None
    wandb_dir: str | None = None
    wandb_run_id: str | None = None
    archive_path: str | None = None
    archive_sha256: str | None = None
    served_model: str | None = None
    served_version: str | None = None
    class_names: tuple[str, ...] = ()
    # the validation images the promotion gate compares on (paths relative to the data root)
    gate_sample: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    id: str
    spec: JobSpec
    state: JobState
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    attempts: int = 0
    idempotency_key: str | None = None
    cancel_requested: bool = False
    result: JobResult = JobResult()
    owner: str | None = None  # the client that created it (None: no authentication)
