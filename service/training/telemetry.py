"""What a run tells the outside world: INFO/WARNING events, TensorBoard and W&B logs, the layer table."""

from __future__ import annotations

import logging
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from service.records import EventKind
from service.training.freezing import TrainablePart
from service.training.loop import Evaluation
from service.training.scan import Skipped, skip_summary
from service.training.tb_figures import choose_preview, confusion_figure
from service.training.tb_logger import MAX_GRID_IMAGES

if TYPE_CHECKING:
    from service.training.state import Run

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 16  # validation images in the per-epoch predictions grid


def announce(run: Run) -> None:
    """INFO events for the device, the data and the model; the result fields known at the start."""
    reporter, splits, loaders, plan = run.reporter, run.data.splits, run.data.loaders, run.network.plan
    reporter.result(
        device=run.device.describe(),
        class_names=run.class_names,
        checkpoint_dir=str(run.sinks.checkpoints.directory),
        monitor=run.spec.early_stopping.monitor,
        **run.sinks.metrics.result_fields(),
    )
    reporter.event(EventKind.INFO, f"training on {run.device.describe()}", {"device": run.device.describe()})
    reporter.event(
        EventKind.INFO,
        f"{len(loaders.train_dataset)} training and {len(loaders.val_dataset)} validation images in "
        f"{len(splits.class_names)} classes",
        {
            "class_names": list(splits.class_names),
            "train_images": len(loaders.train_dataset),
            "val_images": len(loaders.val_dataset),
            "in_memory": loaders.cached,
            "num_workers": loaders.num_workers,
            "image_size": run.network.preprocessing.crop_size,
        },
    )
    report_skips(run, list(splits.skipped) + list(loaders.skipped), "the dataset")
    reporter.event(
        EventKind.INFO,
        f"{run.network.built.architecture} ({run.network.built.weights} weights): froze {plan.depth} blocks, "
        f"{plan.trainable_params} trainable / {plan.frozen_params} frozen parameters",
        {
            "architecture": run.network.built.architecture,
            "weights": run.network.built.weights,
            "frozen_blocks": list(plan.frozen_blocks),
            "trainable_params": plan.trainable_params,
            "frozen_params": plan.frozen_params,
        },
    )
    if run.sinks.metrics.tensorboard.enabled:
        run.sinks.metrics.tensorboard.text("model/layers", layer_table(run), 0)
        log_graph(run)


def log_graph(run: Run) -> None:
    """The graph of what trains: the rest of the network after a split-off frozen prefix (fed the
    prefix's output, as cached features are), else the whole model. Traced once, on one blank image."""
    size = run.network.preprocessing.crop_size
    example = torch.zeros(1, 3, size, size, device=run.device.device)
    run.model.eval()  # BatchNorm on one image; run_epoch sets each block's mode before training
    module: nn.Module = run.model
    if run.network.split is not None:
        with torch.no_grad():
            example = run.network.split.prefix(example)
        module = TrainablePart(run.network.split.rest)
    run.sinks.metrics.tensorboard.graph(module, example)


def report_skips(run: Run, skipped: list[Skipped], where: str) -> None:
    new = [s for s in skipped if s.path not in run.progress.reported_skips]
    if not new:
        return
    run.progress.reported_skips.update(s.path for s in new)
    summary = skip_summary(new)
    reasons = ", ".join(f"{n} {reason}" for reason, n in summary["reasons"].items())
    run.reporter.event(EventKind.WARNING, f"skipped {len(new)} file(s) in {where}: {reasons}", summary)


def log_epoch(
    run: Run, epoch: int, metrics: dict[str, Any], first_images: Tensor | None, evaluated: Evaluation
) -> None:
    values = {f"epoch/{k}": float(v) for k, v in metrics.items() if k != "epoch"}
    sink, tb = run.sinks.metrics, run.sinks.metrics.tensorboard
    sink.epoch(values, epoch, run.progress.step)
    tb.histograms(run.model, epoch)
    mean, std = mean_std(run)
    if first_images is not None:
        tb.image_grid("train/batch", first_images, mean, std, epoch)
    if tb.enabled:
        log_evaluation(run, epoch, evaluated)
    tb.flush()


def log_evaluation(run: Run, epoch: int, evaluated: Evaluation) -> None:
    """The confusion-matrix figure, the PR curves (binary, multilabel) and the predictions grid."""
    predictions, targets, tb = evaluated.all_predictions, evaluated.all_targets, run.sinks.metrics.tensorboard
    if predictions is None or targets is None:
        return
    confusion = evaluated.accumulator.report(run.class_names).confusion
    figure = confusion_figure(confusion, run.class_names, f"validation, epoch {epoch}")
    tb.figure("val/confusion_matrix", figure, epoch)
    if evaluated.scores is not None:
        for name, truths, scores in run.task.pr_curves(run.class_names, targets, evaluated.scores):
            tb.pr_curve(f"val/pr_curve/{name}", truths, scores, epoch)
    chosen = choose_preview(predictions, targets, PREVIEW_IMAGES)
    images = validation_images(run, chosen, {s.path for s in evaluated.skipped})
    if images is not None:
        predicted = label_names(run, predictions[chosen])
        actual = label_names(run, targets[chosen])
        tb.predictions(images, predicted, actual, *mean_std(run), epoch)


def validation_images(run: Run, positions: list[int], skipped: set[Any]) -> Tensor | None:
    """The validation images at `positions` of the evaluation's order (which leaves out the images that
    failed to decode), read back from the dataset: no pixels are kept during evaluation."""
    dataset = run.data.loaders.val_dataset
    decoded = [i for i, sample in enumerate(dataset.samples) if sample.path not in skipped]
    items = [dataset[(0, decoded[p])] for p in positions]
    images = [item[0] for item in items if not isinstance(item, Skipped)]
    return torch.stack(images) if images and len(images) == len(positions) else None


def first_training_images(run: Run, epoch: int) -> Tensor | None:
    """The first images of epoch `epoch` as the image loader orders them, for the `train/batch` grid of
    an epoch that trains on cached features (no augmentation then, so these are the pixels it saw)."""
    if not run.sinks.metrics.tensorboard.enabled:
        return None
    run.data.loaders.set_epoch(epoch)
    dataset, limit = run.data.loaders.train_dataset, min(run.spec.training.batch_size, MAX_GRID_IMAGES)
    items = (dataset[key] for key in run.data.loaders.train.sampler)  # type: ignore[union-attr]
    images = [item[0] for item in islice((i for i in items if not isinstance(i, Skipped)), limit)]
    return torch.stack(images) if images else None


def label_names(run: Run, labels: Tensor) -> list[str]:
    if labels.dim() == 2:  # multilabel rows of 0/1
        return [
            ";".join(n for n, on in zip(run.class_names, row, strict=True) if on) or "-" for row in labels
        ]
    return [run.class_names[int(i)] for i in labels]


def mean_std(run: Run) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return run.network.preprocessing.mean, run.network.preprocessing.std


def hparams(run: Run) -> dict[str, Any]:
    spec, training = run.spec, run.spec.training
    return {
        "architecture": run.network.built.architecture,
        "weights": run.network.built.weights,
        "task": spec.task,
        "freeze_depth": run.network.plan.depth,
        "batchnorm": spec.freeze.batchnorm,
        "image_size": run.network.preprocessing.crop_size,
        "epochs": training.epochs,
        "batch_size": training.batch_size,
        "optimizer": training.optimizer,
        "lr": training.lr,
        "momentum": training.momentum,
        "weight_decay": training.weight_decay,
        "scheduler": training.scheduler,
        "augmentation": training.augmentation,
        "label_smoothing": training.label_smoothing,
        "seed": training.seed,
        "precision": run.device.describe(),
    }


def layer_table(run: Run) -> str:
    from service.training.layers import describe_model

    try:
        description = describe_model(
            run.network.built.architecture,
            image_size=run.network.preprocessing.crop_size,
            num_classes=run.num_outputs,
            freeze=run.spec.freeze,
            torch_home=run.network.torch_home,
            weights=run.spec.model.weights,
        )
    except Exception as exc:  # the table is a nicety; never fail a job over it
        log.warning("cannot describe %s: %s", run.network.built.architecture, exc)
        return f"(layer table unavailable: {exc})"
    lines = ["| # | block | type | output | params | frozen | head |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r.index} | {r.name} | {r.type} | {list(r.output_shape)} | {r.params} | {r.frozen} "
        f"| {r.is_head} |"
        for r in description.layers
    ]
    return "\n".join(lines)
