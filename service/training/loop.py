"""One epoch of training and one pass of evaluation, the way torchvision's reference script reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from service.records import EventKind
from service.training.loaders import Loader
from service.training.metrics import MetricAccumulator
from service.training.reporting import Reporter
from service.training.scan import Skipped
from service.training.steps import DevicePlan, Objective, Trainer

StepLogger = Callable[[dict[str, float], int], None]  # (values, optimizer step)
# DDP, once per step: (this rank's batch is empty) -> (the stop reason of any rank, whether any rank's batch
# is empty), the same on every rank, so that they all stop or skip that step together
StepAgreement = Callable[[bool], tuple[str | None, bool]]


@dataclass
class EpochResult:
    metrics: dict[str, float]  # loss, accuracy (and top5_accuracy) over the epoch's steps
    steps: int  # optimizer steps taken
    skipped: list[Skipped] = field(default_factory=list)  # images that failed to decode
    stopped: str | None = None  # the reason, when asked to stop before the epoch ended
    first_images: Tensor | None = None  # the first batch, for TensorBoard


@dataclass(frozen=True)
class EpochPlan:
    """Which epoch a pass is (1-based), the optimizer steps taken before it, and its step limit."""

    epoch: int
    first_step: int = 0
    max_steps: int | None = None


def train_one_epoch(
    trainer: Trainer,
    loader: Loader,
    plan: EpochPlan,
    reporter: Reporter,
    *,
    log_step: StepLogger | None = None,
    progress_every_s: float = 1.0,
    agree: StepAgreement | None = None,
) -> EpochResult:
    """Train over the loader (at most `plan.max_steps` batches).

    The caller puts the model in train mode (freezing decides which blocks stay in eval). Under DDP
    (`agree`, in place of `reporter.stop_requested()`) a batch none of whose images decoded on one rank
    is skipped by every rank: a rank that skipped alone would pair its next collectives with its peers'
    gradient all-reduce and the group would hang until the collective timeout.
    """
    epoch, max_steps, objective, device = plan.epoch, plan.max_steps, trainer.objective, trainer.device
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    # binary/multilabel: the job's threshold, as validation, the handler and the promotion gate decide
    accumulator = MetricAccumulator(objective.task, objective.num_classes, objective.threshold)
    result = EpochResult(metrics={}, steps=0)
    started = last_report = time.monotonic()
    for i, (images, targets, skipped) in enumerate(loader):
        if i >= steps:
            break
        empty = images.numel() == 0  # every image of the batch failed to decode
        reason, skip = agree(empty) if agree is not None else (reporter.stop_requested(), empty)
        if reason:
            result.stopped = reason
            return result
        result.skipped += skipped
        if skip:
            continue
        if result.first_images is None:
            result.first_images = images
        images, targets = device.to_device(images, targets)
        with device.autocast():
            logits = trainer.forward(images)
            loss = objective.loss(logits, targets)
        lr = trainer.optimisation.step(loss)

        result.steps += 1
        loss_value = loss.item()
        accuracy = accumulator.update(loss_value, logits, targets)
        if log_step is not None:
            values = {"train/loss": loss_value, "train/accuracy": accuracy, "train/lr": lr}
            log_step(values, plan.first_step + result.steps)
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
    loader: Loader,
    objective: Objective,
    device: DevicePlan,
    *,
    reporter: Reporter | None = None,
    keep: int = 0,
    head: nn.Module | None = None,
) -> Evaluation:
    """Loss and accuracy over the whole loader, in eval mode; keeps the first `keep` images and, with
    `head`, the features that enter it (the penultimate features)."""
    task, threshold = objective.task, objective.threshold
    model.eval()
    accumulator = MetricAccumulator(task, objective.num_classes, threshold)
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
                loss = objective.loss(logits, targets_on_device)
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
