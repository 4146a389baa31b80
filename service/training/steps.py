"""What a training step needs, grouped: where the math runs, what the logits are judged by, and the
optimiser's state. The loop (service.training.loop) takes these instead of a long parameter list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.tasks import TaskStrategy

Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DevicePlan:
    """Where and how the math runs: the device, the autocast dtype (None: fp32), the memory format."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def describe(self) -> str:
        dtype = str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32"
        return f"{self.device} ({dtype}{', channels_last' if self.channels_last else ''})"

    def to_device(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images, targets.to(self.device, non_blocking=True)

    def autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)


@dataclass(frozen=True)
class Objective:
    """How logits are judged: the task's loss and decisions over `num_classes`, at `threshold`."""

    task: TaskStrategy
    criterion: nn.Module
    num_classes: int
    threshold: float = 0.5

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.criterion(logits, self.task.loss_targets(targets))


@dataclass
class Optimisation:
    """The optimiser, its learning-rate schedule (stepped per step or per epoch) and the AMP scaler."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scheduler_per_step: bool = False

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, loss: Tensor) -> float:
        """One optimizer step on `loss`; returns the learning rate it used."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        if self.scheduler is not None and self.scheduler_per_step:
            self.scheduler.step()
        return lr

    def end_epoch(self) -> None:
        if self.scheduler is not None and not self.scheduler_per_step:
            self.scheduler.step()


@dataclass(frozen=True)
class Trainer:
    """Everything one training step uses: the forward pass, what judges it, and what it updates."""

    forward: Forward
    objective: Objective
    optimisation: Optimisation
    device: DevicePlan
