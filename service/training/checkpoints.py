"""Checkpoints: a dict with fixed keys and a format version, written atomically, kept as last/best/top-k.

Layout of `<job_dir>/checkpoints/`:
- `last.pt`        the state after the latest finished epoch; a job resumes from it
- `best.pt`        the state of the best epoch by the monitored metric (what gets packaged and served)
- `epoch-NNNN.pt`  the `keep_top_k` best epochs (NNNN is the 1-based epoch)

`best.pt` and `epoch-NNNN.pt` are hard links to the `last.pt` written that epoch (a copy where the
filesystem has no hard links), so an epoch is serialised once. Every file is moved into place with
`os.replace`, so a crash or a full disk leaves the previous files whole.
"""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from service.errors import FailedPrecondition
from service.training.atomic_files import PARTIAL_FILE, WriteRecorder, atomic_target, publish_copy

FORMAT_VERSION = 1
CHECKPOINT_KEYS = frozenset(
    {
        "format_version",
        "model",  # state_dict of the (uncompiled) model
        "optimizer",
        "scheduler",  # None without a scheduler
        "scaler",  # GradScaler state; {} when disabled
        "epoch",  # epochs completed (1-based number of the epoch this state ends)
        "step",  # optimizer steps taken so far
        "history",  # one dict of metrics per finished epoch, each with "epoch"
        "early_stopping",  # EarlyStopping.state_dict()
        "rng",  # capture_rng()
        "spec",  # JobSpec.to_dict()
        "class_names",
        "wandb_run_id",
        "metrics",  # this epoch's metrics
        "model_config",  # what serving needs: architecture, num_classes, task, sizes, mean/std, ...
    }
)
MODEL_CONFIG_KEYS = frozenset(
    {
        "architecture",
        "num_classes",
        "task",
        "image_size",
        "resize_size",
        "mean",
        "std",
        "interpolation",
        "threshold",
        "class_names",
        "top_k",
    }
)
LAST, BEST = "last.pt", "best.pt"
_EPOCH_FILE = re.compile(r"^epoch-(\d{4,})\.pt$")


def make_checkpoint(
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any] | None,
    scaler: dict[str, Any],
    epoch: int,
    step: int,
    history: list[dict[str, Any]],
    early_stopping: dict[str, Any],
    rng: dict[str, Any],
    spec: dict[str, Any],
    class_names: list[str],
    wandb_run_id: str | None,
    metrics: dict[str, float],
    model_config: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict, format FORMAT_VERSION: the one place its keys are written (see CHECKPOINT_KEYS).

    Every argument is already plain data (state_dicts, lists, JSON-like dicts), as torch.load's
    weights_only unpickler reads it back.
    """
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "epoch": epoch,
        "step": step,
        "history": list(history),
        "early_stopping": early_stopping,
        "rng": rng,
        "spec": spec,
        "class_names": list(class_names),
        "wandb_run_id": wandb_run_id,
        "metrics": metrics,
        "model_config": model_config,
    }


def checkpoint_dir(job_dir: Path) -> Path:
    return job_dir / "checkpoints"


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


def discard_partial_writes(directory: Path) -> list[Path]:
    """Delete the temporary files of writes a crash (SIGKILL, power loss) cut short; returns them.

    Only a process that died mid-write leaves one, and nothing ever reads them: without this, every
    crash during a checkpoint write would leave up to a checkpoint's size of garbage behind.
    """
    if not directory.is_dir():
        return []
    partial = [p for p in directory.iterdir() if PARTIAL_FILE.match(p.name)]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Validate `state` and write it to `path` atomically; a full disk raises ResourceExhausted."""
    validate_checkpoint(state, path)
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        recorder = WriteRecorder(f)
        try:
            torch.save(state, cast(IO[bytes], recorder))  # it needs only write() and flush()
        except RuntimeError as exc:
            if recorder.error is None:
                raise
            # torch reports a failed write only as "unexpected pos"; the OSError says what happened
            raise recorder.error from exc
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` and check its keys and format version."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FailedPrecondition(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # a truncated or foreign file fails in many ways inside the unpickler
        raise FailedPrecondition(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to start the "
            "job over, or restore it from a backup"
        ) from exc
    validate_checkpoint(state, path)
    return state


def validate_checkpoint(state: Any, path: Path) -> None:
    if not isinstance(state, dict):
        raise FailedPrecondition(
            f"checkpoint {path} holds a {type(state).__name__}, not a tuneserve checkpoint"
        )
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise FailedPrecondition(
            f"checkpoint {path} has format_version {version!r}; this service reads version {FORMAT_VERSION} "
            "only. Train the job again with this version of the service"
        )
    missing, extra = CHECKPOINT_KEYS - state.keys(), state.keys() - CHECKPOINT_KEYS
    if missing or extra:
        raise FailedPrecondition(
            f"checkpoint {path} has the wrong keys (missing: {sorted(missing)}, "
            f"unexpected: {sorted(extra)}); "
            f"a format {FORMAT_VERSION} checkpoint has exactly: {sorted(CHECKPOINT_KEYS)}"
        )
    missing_config = MODEL_CONFIG_KEYS - set(state["model_config"])
    if missing_config:
        raise FailedPrecondition(f"checkpoint {path}: model_config lacks {sorted(missing_config)}")


@dataclass(frozen=True)
class Saved:
    path: Path  # last.pt
    is_best: bool
    best_epoch: int | None
    best_metric: float | None


class CheckpointKeeper:
    """Writes `last.pt` each epoch and keeps `best.pt` and the top-k epochs by the monitored metric.

    Which epochs are best is derived from the metric history alone, so a resumed job keeps the same
    files as one that never stopped. Earlier epochs win ties; NaN never ranks.
    """

    def __init__(
        self, directory: Path, monitor: str, is_better: Callable[[float, float], bool], keep_top_k: int = 1
    ) -> None:
        self.directory = directory
        self.monitor = monitor
        self.keep_top_k = keep_top_k
        self._is_better = is_better

    @property
    def last_path(self) -> Path:
        return self.directory / LAST

    @property
    def best_path(self) -> Path:
        return self.directory / BEST

    def save(self, state: dict[str, Any]) -> Saved:
        """Write `state` (whose history ends with its epoch) as last.pt, then update best and top-k."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state, self.last_path)
        return self.publish(state["epoch"], state["history"])

    def publish(self, epoch: int, history: list[dict[str, Any]]) -> Saved:
        """Make best.pt and epoch files agree with `history`, given last.pt holds `epoch` (also on resume)."""
        ranked = self.rank(history)
        is_best = bool(ranked) and ranked[0][0] == epoch
        if is_best:
            publish_copy(self.last_path, self.best_path)
        keep = {e for e, _ in ranked[: self.keep_top_k]}
        if epoch in keep:
            publish_copy(self.last_path, self.directory / epoch_file(epoch))
        for path in self.directory.iterdir():
            match = _EPOCH_FILE.match(path.name)
            if match and int(match.group(1)) not in keep:
                path.unlink(missing_ok=True)
        best_epoch, best_metric = ranked[0] if ranked else (None, None)
        return Saved(self.last_path, is_best, best_epoch, best_metric)

    def rank(self, history: list[dict[str, Any]]) -> list[tuple[int, float]]:
        """(epoch, metric) of every epoch with a finite metric, best first; ties keep the earlier epoch."""
        entries = [
            (int(h["epoch"]), float(h[self.monitor]))
            for h in history
            if h.get(self.monitor) is not None and np.isfinite(h[self.monitor])
        ]

        def order(a: tuple[int, float], b: tuple[int, float]) -> int:
            return -1 if self._is_better(a[1], b[1]) else 1 if self._is_better(b[1], a[1]) else 0

        return sorted(entries, key=functools.cmp_to_key(order))  # stable: ties stay in epoch order


def capture_rng() -> dict[str, Any]:
    """Every random generator's state, in types `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
