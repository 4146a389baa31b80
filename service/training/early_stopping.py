"""Early stopping on a monitored metric, and the one comparator that decides what "better" means."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from service.errors import FailedPrecondition
from service.spec import EarlyStoppingSpec

Mode = Literal["min", "max"]


def comparator(mode: Mode, min_delta: float = 0.0) -> Callable[[float, float], bool]:
    """`is_better(new, best)`: True when `new` improves on `best` by more than `min_delta`. NaN never does."""
    if mode == "min":
        return lambda new, best: new < best - min_delta
    return lambda new, best: new > best + min_delta


class EarlyStopping:
    """Stops after `patience` epochs without improvement; `reason` says why it stopped.

    When disabled it still tracks the best value but never asks to stop.
    """

    def __init__(
        self, monitor: str, mode: Mode, patience: int, min_delta: float = 0.0, enabled: bool = True
    ) -> None:
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.enabled = enabled
        self._is_better = comparator(mode, min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.reason: str | None = None

    @classmethod
    def from_spec(cls, spec: EarlyStoppingSpec) -> EarlyStopping:
        return cls(spec.monitor, spec.resolved_mode, spec.patience, spec.min_delta, spec.enabled)

    @property
    def should_stop(self) -> bool:
        return self.stopped_epoch is not None

    def step(self, value: float, epoch: int) -> bool:
        """Record the monitored value of `epoch`; True when training should stop now."""
        if not math.isfinite(value):
            self.bad_epochs += 1
            return self._stop(epoch, f"{self.monitor} is {value} at epoch {epoch}; training diverged")
        if self.best is None or self._is_better(value, self.best):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            return self._stop(
                epoch,
                f"{self.monitor} did not improve by more than {self.min_delta} for {self.bad_epochs} "
                f"epoch(s) (patience {self.patience}); best {self.best:.6g} at epoch {self.best_epoch}",
            )
        return False

    def _stop(self, epoch: int, reason: str) -> bool:
        if not self.enabled:
            return False
        self.stopped_epoch, self.reason = epoch, reason
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_epoch": self.stopped_epoch,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["monitor"] != self.monitor or state["mode"] != self.mode:
            raise FailedPrecondition(
                f"the checkpoint's early stopping monitors {state['monitor']} ({state['mode']}) but this run "
                f"monitors {self.monitor} ({self.mode}); resume with the spec the job started with"
            )
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs, self.stopped_epoch, self.reason = (
            state["bad_epochs"],
            state["stopped_epoch"],
            state["reason"],
        )
