"""One epoch of training and one pass of evaluation, the way torchvision's reference script reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from service.records import EventKind
from service.tasks import TaskStrategy
from service.training.data import Skipped
from service.training.datasets import Loader
from service.training.metrics import MetricAccumulator
from service.training.reporting import Reporter

Forward = Callable[[Tensor], Tensor]
StepLogger = Callable[[int, dict[str, float]], None]


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


@dataclass
class EpochResult:
    metrics: dict[str, float]  # loss, accuracy (and top5_accuracy) over the epoch's steps
    steps: int  # optimizer steps taken
    skipped: list[Skipped] = field(default_factory=list)  # images that failed to decode
    stopped: str | None = None  # the reason, when asked to stop before the epoch ended
    first_images: Tensor | None = None  # the first batch, for TensorBoard


def train_one_epoch(
    forward: Forward,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Loader,
    *,
    task: TaskStrategy,
    num_classes: int,
    epoch: int,
    step: int,
    device: DevicePlan,
    reporter: Reporter,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_steps: int | None = None,
    log_step: StepLogger | None = None,
    progress_every_s: float = 1.0,
) -> EpochResult:
    """Train over the loader (at most `max_steps` batches); stepping `scheduler` after every step when given.

    The caller puts the model in train mode (freezing decides which blocks stay in eval). `epoch` is
    1-based; `step` is the number of optimizer steps before this epoch.
    """
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    accumulator = MetricAccumulator(task, num_classes)
    result = EpochResult(metrics={}, steps=0)
    started = last_report = time.monotonic()
    for i, (images, targets, skipped) in enumerate(loader):
        if i >= steps:
            break
        if reason := reporter.stop_requested():
            result.stopped = reason
            return result
        result.skipped += skipped
        if images.numel() == 0:  # every image of the batch failed to decode
            continue
        if result.first_images is None:
            result.first_images = images
        images, targets = device.to_device(images, targets)
        with device.autocast():
            logits = forward(images)
            loss = criterion(logits, task.loss_targets(targets))

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        if scheduler is not None:
            scheduler.step()

        result.steps += 1
        loss_value = loss.item()
        accuracy = accumulator.update(loss_value, logits, targets)
        if log_step is not None:
            log_step(
                step + result.steps, {"train/loss": loss_value, "train/accuracy": accuracy, "train/lr": lr}
            )
        now = time.monotonic()
        # the first step at once: it tells a watcher the job is past its set-up and training
        if result.steps == 1 or now - last_report >= progress_every_s or i + 1 == steps:
            last_report = now
            reporter.event(
                EventKind.PROGRESS,
                f"epoch {epoch} step {i + 1}/{steps} loss {loss_value:.4f}",
                {
                    "epoch": epoch,
                    "step": i + 1,
                    "steps": steps,
                    "loss": loss_value,
                    "lr": lr,
                    "images_per_s": accumulator.count / max(now - started, 1e-9),
                },
            )
    result.metrics = accumulator.compute()
    return result


@dataclass
class Evaluation:
    metrics: dict[str, float]  # loss, accuracy (and top5_accuracy)
    accumulator: MetricAccumulator  # for the per-class report
    stopped: str | None = None
    skipped: list[Skipped] = field(default_factory=list)
    # every decoded image's prediction and target, in loader order; for binary and multilabel also its
    # probabilities (the PR curves). Small: one row per image, no pixels.
    all_predictions: Tensor | None = None
    all_targets: Tensor | None = None
    scores: Tensor | None = None
    # the first `keep` images, with their targets, predictions and penultimate features (when asked)
    images: Tensor | None = None
    targets: Tensor | None = None
    predictions: Tensor | None = None
    features: Tensor | None = None


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: Loader,
    *,
    task: TaskStrategy,
    num_classes: int,
    threshold: float,
    device: DevicePlan,
    reporter: Reporter | None = None,
    keep: int = 0,
    head: nn.Module | None = None,
) -> Evaluation:
    """Loss and accuracy over the whole loader, in eval mode; keeps the first `keep` images and, with
    `head`, the features that enter it (the penultimate features)."""
    model.eval()
    accumulator = MetricAccumulator(task, num_classes, threshold)
    kept: dict[str, list[Tensor]] = {"images": [], "targets": [], "predictions": [], "features": []}
    seen: dict[str, list[Tensor]] = {"predictions": [], "targets": [], "scores": []}
    captured: list[Tensor] = []
    hook = None
    if head is not None and keep:
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1).float()))
    evaluation = Evaluation(metrics={}, accumulator=accumulator)
    try:
        for images, targets, skipped in loader:
            if reporter is not None and (reason := reporter.stop_requested()):
                evaluation.stopped = reason
                return evaluation
            evaluation.skipped += skipped
            if images.numel() == 0:
                continue
            on_device, targets_on_device = device.to_device(images, targets)
            with device.autocast():
                logits = model(on_device)
                loss = criterion(logits, task.loss_targets(targets_on_device))
            accumulator.update(loss.item(), logits, targets)
            on_cpu = logits.float().cpu()
            seen["predictions"].append(task.predict(on_cpu, threshold))
            seen["targets"].append(targets.cpu())
            if (scores := task.pr_scores(on_cpu)) is not None:
                seen["scores"].append(scores)
            room = keep - sum(len(t) for t in kept["images"])
            if room > 0:
                kept["images"].append(images[:room])
                kept["targets"].append(targets[:room])
                kept["predictions"].append(task.predict(logits[:room].float().cpu(), threshold))
                if captured:
                    kept["features"].append(captured[-1][:room].cpu())
            captured.clear()
    finally:
        if hook is not None:
            hook.remove()
    evaluation.metrics = accumulator.compute()
    joined: dict[str, Any] = {k: torch.cat(v) if v else None for k, v in kept.items()}
    evaluation.images, evaluation.targets = joined["images"], joined["targets"]
    evaluation.predictions, evaluation.features = joined["predictions"], joined["features"]
    every: dict[str, Any] = {k: torch.cat(v) if v else None for k, v in seen.items()}
    evaluation.all_predictions, evaluation.all_targets = every["predictions"], every["targets"]
    evaluation.scores = every["scores"]
    return evaluation
