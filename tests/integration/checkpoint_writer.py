"""A process that writes checkpoints through CheckpointKeeper for ever, for test_faults to SIGKILL.

It starts like a resumed job (service.training.prepare): partial writes are discarded, best/top-k are
repaired from last.pt's history, and it carries on with the next epoch. Every tensor of epoch N holds
the value N, so a checkpoint mixing two epochs' bytes would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service.training.checkpoints import (
    CheckpointKeeper,
    discard_partial_writes,
    load_checkpoint,
    make_checkpoint,
)
from service.training.early_stopping import comparator

MONITOR = "val_loss"
TOP_K = 2
WEIGHTS = 1_000_000  # 4 MB per tensor: a write takes long enough to be cut in the middle


def keeper(directory: Path) -> CheckpointKeeper:
    return CheckpointKeeper(directory, MONITOR, comparator("min"), TOP_K)


def val_loss(epoch: int) -> float:
    """Goes up and down with the epoch, so the best epoch changes now and then."""
    return (epoch * 7919 % 13) / 13.0


def state(epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    value = float(epoch)
    return make_checkpoint(
        model={"w": torch.full((WEIGHTS,), value), "b": torch.full((7,), value)},
        optimizer={"state": {0: {"exp_avg": torch.full((WEIGHTS,), value)}}, "param_groups": []},
        scheduler=None,
        scaler={},
        epoch=epoch,
        step=epoch * 10,
        history=history,
        early_stopping={},
        rng={},
        spec={},
        class_names=["a", "b"],
        wandb_run_id=None,
        metrics=dict(history[-1]),
        model_config={
            "architecture": "none",
            "num_classes": 2,
            "task": "multiclass",
            "image_size": 32,
            "resize_size": 36,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bilinear",
            "threshold": 0.5,
            "class_names": ["a", "b"],
            "top_k": 1,
        },
    )


def write_for_ever(directory: str) -> None:
    folder = Path(directory)
    keep = keeper(folder)
    discard_partial_writes(folder)
    history: list[dict[str, Any]] = []
    if keep.last_path.exists():
        history = list(load_checkpoint(keep.last_path)["history"])
        keep.publish(len(history), history)  # what a resumed job does: best/top-k agree with last.pt
    while True:
        epoch = len(history) + 1
        history.append({"epoch": epoch, MONITOR: val_loss(epoch)})
        keep.save(state(epoch, history))
