"""Checkpoints: fixed keys and format version, atomic writes, best and top-k, RNG state."""

from __future__ import annotations

import errno
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from service.errors import FailedPrecondition, ResourceExhausted
from service.training import checkpoints
from service.training.checkpoints import (
    CHECKPOINT_KEYS,
    FORMAT_VERSION,
    CheckpointKeeper,
    capture_rng,
    load_checkpoint,
    make_checkpoint,
    restore_rng,
    save_checkpoint,
)
from service.training.early_stopping import comparator

MODEL_CONFIG = {
    "architecture": "tiny",
    "num_classes": 2,
    "task": "multiclass",
    "image_size": 32,
    "resize_size": 36,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.2, 0.2, 0.2],
    "interpolation": "bilinear",
    "threshold": 0.5,
    "class_names": ["a", "b"],
    "top_k": 2,
}


def _state(epoch: int, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    history = history if history is not None else [{"epoch": epoch, "val_loss": 1.0 / epoch}]
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None,
        "scaler": {},
        "epoch": epoch,
        "step": 10 * epoch,
        "history": history,
        "early_stopping": {"best": 0.5, "best_epoch": 1},
        "rng": capture_rng(),
        "spec": {"name": "job"},
        "class_names": ["a", "b"],
        "wandb_run_id": "abc",
        "metrics": history[-1],
        "model_config": MODEL_CONFIG,
    }


def test_make_checkpoint_builds_the_dict_checkpoints_written_before_it_hold() -> None:
    old = _state(2)  # spelled out by hand, key by key, as training wrote it before make_checkpoint
    made = make_checkpoint(**{k: v for k, v in old.items() if k != "format_version"})
    assert set(made) == set(old) == CHECKPOINT_KEYS
    assert all(made[k] is old[k] or made[k] == old[k] for k in old)


def test_round_trip_keeps_every_fixed_key(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(_state(3), path)
    loaded = load_checkpoint(path)
    assert set(loaded) == CHECKPOINT_KEYS
    assert loaded["format_version"] == FORMAT_VERSION and loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["0.weight"], torch.load(path, weights_only=True)["model"]["0.weight"])


def test_another_format_version_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    state = _state(1) | {"format_version": 99}
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(FailedPrecondition, match="format_version 99; this service reads version 1"):
        load_checkpoint(tmp_path / "old.pt")


def test_missing_or_extra_keys_are_named(tmp_path: Path) -> None:
    state = _state(1)
    del state["optimizer"]
    state["surprise"] = 1
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(FailedPrecondition, match=r"missing: \['optimizer'\], unexpected: \['surprise'\]"):
        load_checkpoint(tmp_path / "odd.pt")


def test_a_pickled_object_is_refused_by_weights_only(tmp_path: Path) -> None:
    torch.save({"format_version": 1, "model": nn.Linear(2, 2)}, tmp_path / "pickle.pt")
    with pytest.raises(FailedPrecondition, match="cannot be read"):
        load_checkpoint(tmp_path / "pickle.pt")


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path / "last.pt")
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FailedPrecondition, match="cannot be read"):
        load_checkpoint(tmp_path / "cut.pt")


def _failing_save(error: BaseException) -> Any:
    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")  # the temporary file exists and holds a partial write
        raise error

    return save


def test_full_disk_mid_write_keeps_last_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = CheckpointKeeper(tmp_path, "val_loss", comparator("min"))
    keeper.save(_state(1))
    before = (tmp_path / "last.pt").read_bytes()
    monkeypatch.setattr(checkpoints.torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(ResourceExhausted, match=r"no space left to write checkpoint .*previous checkpoints"):
        keeper.save(_state(2, [{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 0.5}]))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-0001.pt", "last.pt"]


def test_a_crash_mid_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(_state(1), tmp_path / "last.pt")
    monkeypatch.setattr(checkpoints.torch, "save", _failing_save(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2), tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def _train(keeper: CheckpointKeeper, monitor: str, values: list[float]) -> list[bool]:
    history: list[dict[str, Any]] = []
    best_flags = []
    for epoch, value in enumerate(values, start=1):
        history.append({"epoch": epoch, monitor: value})
        best_flags.append(keeper.save(_state(epoch, list(history))).is_best)
    return best_flags


def test_best_and_top_k_by_a_decreasing_metric(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, "val_loss", comparator("min"), keep_top_k=2)
    flags = _train(keeper, "val_loss", [0.9, 0.5, 0.7, 0.4, 0.8])
    assert flags == [True, True, False, True, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "epoch-0002.pt",
        "epoch-0004.pt",
        "last.pt",
    ]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4
    assert load_checkpoint(tmp_path / "epoch-0002.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 5


def test_best_by_an_increasing_metric_keeps_the_earlier_of_ties(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, "val_accuracy", comparator("max"), keep_top_k=1)
    flags = _train(keeper, "val_accuracy", [0.5, 0.7, 0.7, math.nan])
    assert flags == [True, True, False, False]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-0002.pt", "last.pt"]


def test_best_is_a_link_not_a_second_serialisation(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path, "val_loss", comparator("min"))
    keeper.save(_state(1))
    assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "last.pt").stat().st_ino
    keeper.save(_state(2, [{"epoch": 1, "val_loss": 0.1}, {"epoch": 2, "val_loss": 0.9}]))
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1  # replacing last.pt left best.pt alone


def test_publish_repairs_best_after_a_crash_between_writes(tmp_path: Path) -> None:
    history = [{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.5}]
    save_checkpoint(_state(1, history[:1]), tmp_path / "best.pt")
    save_checkpoint(_state(2, history), tmp_path / "last.pt")  # the crash came before best.pt moved on
    saved = CheckpointKeeper(tmp_path, "val_loss", comparator("min")).publish(2, history)
    assert saved.is_best and saved.best_epoch == 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = _state(1)
    save_checkpoint(state, tmp_path / "last.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
