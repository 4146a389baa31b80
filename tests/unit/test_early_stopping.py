"""Early stopping: patience, min_delta, mode, NaN, and its state across a resume."""

from __future__ import annotations

import math

import pytest

from service.errors import FailedPrecondition
from service.spec import EarlyStoppingSpec
from service.training.early_stopping import EarlyStopping, comparator


def _run(stopper: EarlyStopping, values: list[float]) -> int | None:
    for epoch, value in enumerate(values, start=1):
        if stopper.step(value, epoch):
            return epoch
    return None


def test_stops_after_patience_epochs_without_improvement_and_says_why() -> None:
    stopper = EarlyStopping("val_loss", "min", patience=2)
    assert _run(stopper, [1.0, 0.8, 0.9, 0.85, 0.7]) == 4
    assert stopper.best == 0.8 and stopper.best_epoch == 2
    assert stopper.reason is not None
    assert "val_loss did not improve" in stopper.reason and "best 0.8 at epoch 2" in stopper.reason


def test_min_delta_treats_small_gains_as_no_improvement() -> None:
    stopper = EarlyStopping("val_loss", "min", patience=2, min_delta=0.1)
    assert _run(stopper, [1.0, 0.95, 0.92]) == 3


def test_max_mode_for_accuracy() -> None:
    stopper = EarlyStopping.from_spec(EarlyStoppingSpec(monitor="val_accuracy", patience=1))
    assert stopper.mode == "max"
    assert _run(stopper, [0.5, 0.6, 0.55]) == 3
    assert stopper.best == 0.6


def test_nan_stops_at_once() -> None:
    stopper = EarlyStopping("val_loss", "min", patience=5)
    assert _run(stopper, [1.0, math.nan]) == 2
    assert stopper.reason is not None and "diverged" in stopper.reason


def test_disabled_tracks_the_best_but_never_stops() -> None:
    stopper = EarlyStopping("val_loss", "min", patience=1, enabled=False)
    assert _run(stopper, [1.0, 2.0, 3.0, math.nan]) is None
    assert stopper.best == 1.0


def test_state_dict_resumes_the_count() -> None:
    first = EarlyStopping("val_loss", "min", patience=3)
    _run(first, [1.0, 1.1, 1.2])  # two bad epochs
    resumed = EarlyStopping("val_loss", "min", patience=3)
    resumed.load_state_dict(first.state_dict())
    assert resumed.step(1.3, 4) is True  # the third bad epoch


def test_state_of_another_monitor_is_refused() -> None:
    other = EarlyStopping("val_accuracy", "max", patience=3)
    with pytest.raises(FailedPrecondition, match="monitors val_accuracy"):
        EarlyStopping("val_loss", "min", patience=3).load_state_dict(other.state_dict())


def test_comparator_never_prefers_nan() -> None:
    better = comparator("min")
    assert better(0.5, 1.0) and not better(1.0, 0.5)
    assert not better(math.nan, 1.0) and not better(1.0, 1.0)
