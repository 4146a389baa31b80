"""What a run tells the outside world: INFO/WARNING events, TensorBoard and W&B logs, the layer table."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import Tensor

from service.jobs.records import EventKind
from service.training.data import Skipped, skip_summary
from service.training.loop import Evaluation

if TYPE_CHECKING:
    from service.training.session import Run

log = logging.getLogger(__name__)


def announce(run: Run) -> None:
    """INFO events for the device, the data and the model; the result fields known at the start."""
    reporter, splits, loaders, plan = run.reporter, run.splits, run.loaders, run.plan
    reporter.result(
        device=run.device.describe(),
        class_names=run.class_names,
        checkpoint_dir=str(run.keeper.directory),
        monitor=run.spec.early_stopping.monitor,
        tensorboard_dir=str(run.tensorboard.log_dir) if run.tensorboard.enabled else None,
        wandb_dir=str(run.wandb.run_dir) if run.wandb.run_dir else None,
        wandb_run_id=run.wandb.run_id,
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
            "image_size": run.preprocessing.crop_size,
        },
    )
    report_skips(run, list(splits.skipped) + list(loaders.skipped), "the dataset")
    reporter.event(
        EventKind.INFO,
        f"{run.built.architecture} ({run.built.weights} weights): froze {plan.depth} blocks, "
        f"{plan.trainable_params} trainable / {plan.frozen_params} frozen parameters",
        {
            "architecture": run.built.architecture,
            "weights": run.built.weights,
            "frozen_blocks": list(plan.frozen_blocks),
            "trainable_params": plan.trainable_params,
            "frozen_params": plan.frozen_params,
        },
    )
    if run.tensorboard.enabled:
        run.tensorboard.text("model/layers", layer_table(run), 0)


def report_skips(run: Run, skipped: list[Skipped], where: str) -> None:
    new = [s for s in skipped if s.path not in run.reported_skips]
    if not new:
        return
    run.reported_skips.update(s.path for s in new)
    summary = skip_summary(new)
    reasons = ", ".join(f"{n} {reason}" for reason, n in summary["reasons"].items())
    run.reporter.event(EventKind.WARNING, f"skipped {len(new)} file(s) in {where}: {reasons}", summary)


def log_step(run: Run, step: int, values: dict[str, float]) -> None:
    run.tensorboard.scalars(values, step)
    run.wandb.log(values, step)


def log_epoch(
    run: Run, epoch: int, metrics: dict[str, Any], first_images: Tensor | None, evaluated: Evaluation
) -> None:
    values = {f"epoch/{k}": float(v) for k, v in metrics.items() if k != "epoch"}
    run.tensorboard.scalars(values, epoch)
    run.wandb.log({**values, "epoch": epoch}, run.step)
    run.tensorboard.histograms(run.model, epoch)
    mean, std = mean_std(run)
    if first_images is not None:
        run.tensorboard.image_grid("train/batch", first_images, mean, std, epoch)
    if evaluated.images is not None and evaluated.predictions is not None and evaluated.targets is not None:
        predicted = label_names(run, evaluated.predictions)
        actual = label_names(run, evaluated.targets)
        run.tensorboard.predictions(evaluated.images, predicted, actual, mean, std, epoch)
    run.tensorboard.flush()


def label_names(run: Run, labels: Tensor) -> list[str]:
    if labels.dim() == 2:  # multilabel rows of 0/1
        return [
            ";".join(n for n, on in zip(run.class_names, row, strict=True) if on) or "-" for row in labels
        ]
    return [run.class_names[int(i)] for i in labels]


def mean_std(run: Run) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return run.preprocessing.mean, run.preprocessing.std


def hparams(run: Run) -> dict[str, Any]:
    spec, training = run.spec, run.spec.training
    return {
        "architecture": run.built.architecture,
        "weights": run.built.weights,
        "task": spec.task,
        "freeze_depth": run.plan.depth,
        "batchnorm": spec.freeze.batchnorm,
        "image_size": run.preprocessing.crop_size,
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
            run.built.architecture,
            image_size=run.preprocessing.crop_size,
            num_classes=run.num_outputs,
            freeze=run.spec.freeze,
            torch_home=run.torch_home,
            weights=run.spec.model.weights,
        )
    except Exception as exc:  # the table is a nicety; never fail a job over it
        log.warning("cannot describe %s: %s", run.built.architecture, exc)
        return f"(layer table unavailable: {exc})"
    lines = ["| # | block | type | output | params | frozen | head |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r.index} | {r.name} | {r.type} | {list(r.output_shape)} | {r.params} | {r.frozen} "
        f"| {r.is_head} |"
        for r in description.layers
    ]
    return "\n".join(lines)
