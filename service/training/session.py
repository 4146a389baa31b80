"""A training run's state: everything prepare() builds before the first epoch, restored from last.pt.

prepare() reads top-down as the set-up happens: seed -> scan the data -> (load last.pt) -> build the
model -> freeze -> device -> loaders -> optimizer and scheduler -> restore -> start the loggers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from service.errors import DatasetError, FailedPrecondition
from service.records import EventKind
from service.settings import Settings
from service.spec import JobSpec
from service.tasks import TOP_K, TaskStrategy, task_for
from service.training import feature_cache, freezing, registry, telemetry
from service.training.builder import BuiltModel, Preprocessing, build_model, rebuild_model
from service.training.checkpoints import (
    CheckpointKeeper,
    checkpoint_dir,
    discard_partial_writes,
    load_checkpoint,
    restore_rng,
)
from service.training.data import Splits, load_splits
from service.training.datasets import Loader, Loaders, build_loaders, set_epoch
from service.training.early_stopping import EarlyStopping, comparator
from service.training.loop import DevicePlan, Forward
from service.training.optim import make_optimizer, make_scheduler, seed_everything, select_device
from service.training.reporting import Reporter
from service.training.tb_logger import TensorBoardLogger
from service.training.wandb_logger import WandbLogger
from service.training.weights import FILE, resolve_weights


@dataclass
class Run:
    """Everything one training run holds, built by prepare() and advanced by run_epoch()."""

    spec: JobSpec
    reporter: Reporter
    device: DevicePlan
    splits: Splits
    built: BuiltModel
    preprocessing: Preprocessing
    plan: freezing.FreezePlan
    forward: Forward
    loaders: Loaders
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scheduler_per_step: bool
    scaler: torch.amp.GradScaler
    early_stopping: EarlyStopping
    keeper: CheckpointKeeper
    tensorboard: TensorBoardLogger
    wandb: WandbLogger
    model_config: dict[str, Any]
    torch_home: Path
    split: freezing.FrozenSplit | None = None  # the frozen prefix and the rest, when the model splits
    cache_features: bool = False  # train on cached prefix outputs (see service.training.feature_cache)
    feature_loader: Loader | None = None  # built at the first epoch that needs it
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    reported_skips: set[Path] = field(default_factory=set)

    @property
    def model(self) -> nn.Module:
        return self.built.model

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> TaskStrategy:
        return task_for(self.spec.task)

    @property
    def num_outputs(self) -> int:
        return self.task.output_units(len(self.class_names))

    def training_batches(self, epoch: int) -> tuple[Loader, Forward, bool]:
        """This epoch's training loader and forward pass, and whether its batches hold images: cached
        prefix outputs through the rest of the network when they can be cached, else images."""
        if self.cache_features and self.split is not None:
            if self.feature_loader is None:
                self.feature_loader = self._cache_features()
            if self.feature_loader is not None:
                set_epoch(self.feature_loader, epoch)
                return self.feature_loader, self.split.rest, False
        self.loaders.set_epoch(epoch)
        return self.loaders.train, self.forward, True

    def _cache_features(self) -> Loader | None:
        assert self.split is not None
        started = time.monotonic()
        loader, skipped = feature_cache.cache_features(
            self.split, self.loaders.train_dataset, self.device, batch_size=self.spec.training.batch_size,
            seed=self.spec.training.seed, num_workers=self.loaders.num_workers,
        )  # fmt: skip
        telemetry.report_skips(self, skipped, "the frozen-feature pass")
        if loader is None:
            self.cache_features = False
            return None
        self.reporter.event(
            EventKind.INFO,
            f"cached the frozen blocks' outputs for {len(loader.dataset)} images "  # type: ignore[arg-type]
            f"in {time.monotonic() - started:.1f} s; epochs now run only the trainable blocks",
            {"feature_cache": True, "images": len(loader.dataset)},  # type: ignore[arg-type]
        )
        return loader

    def best(self) -> tuple[int | None, float | None, dict[str, float]]:
        ranked = self.keeper.rank(self.history)
        if not ranked:
            return None, None, float_metrics(self.history[-1]) if self.history else {}
        epoch, metric = ranked[0]
        return epoch, metric, float_metrics(next(h for h in self.history if h["epoch"] == epoch))


def prepare(spec: JobSpec, job_dir: Path, settings: Settings, reporter: Reporter) -> Run:
    """Seed, scan the data, build and freeze the model, set up optimisation; resume when last.pt exists."""
    training, task = spec.training, task_for(spec.task)
    seed_everything(training.seed)
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # PIL's own decompression-bomb guard
    splits = load_splits(
        spec.data,
        spec.task,
        settings.data_root,
        seed=training.seed,
        max_image_pixels=settings.max_image_pixels,
    )
    if spec.early_stopping.monitor == "val_top5_accuracy" and not task.has_top_k(len(splits.class_names)):
        raise DatasetError(
            f"early_stopping.monitor 'val_top5_accuracy' needs more than {TOP_K} classes; the dataset has "
            f"{len(splits.class_names)}: monitor val_accuracy or val_loss instead"
        )
    last = checkpoint_dir(job_dir) / "last.pt"
    discard_partial_writes(last.parent)  # left by a previous attempt that died mid-write
    resume = load_checkpoint(last) if last.exists() else None
    units = task.output_units(len(splits.class_names))
    # A resumed job's weights all come from its checkpoint, and so does the network they fit: one
    # written before the builtin Lite0 was fixed holds timm's efficientnet_lite0, not today's builtin.
    if resume is None:
        built = build_model(
            spec.model, units, torch_home=settings.torch_home, weights_root=settings.weights_dir
        )
    else:
        # for reports only: no file is read, and a weights_file admitted before the weights root
        # existed must not stop its job from resuming (its tensors all come from the checkpoint)
        started_from = (
            spec.model.weights
            if spec.model.weights == FILE
            else resolve_weights(spec.model, settings.torch_home, require_file=False).name
        )
        built = rebuild_model(resume["model_config"], units, weights_name=started_from)
    plan = freezing.apply_freeze(built.model, spec.freeze, built.head_names, architecture=built.architecture)
    device = select_device(training, built.model)
    built.model.to(device.device)
    if device.channels_last:
        built.model.to(memory_format=torch.channels_last)
    preprocessing = built.preprocessing.for_image_size(training.image_size)
    loaders = build_loaders(
        splits,
        task=spec.task,
        preprocessing=preprocessing,
        augmentation=training.augmentation,
        batch_size=training.batch_size,
        seed=training.seed,
        num_workers=spec.data.num_workers,
        pin_memory=device.device.type == "cuda",
        max_image_pixels=settings.max_image_pixels,
        decode_device=device.device if device.device.type == "cuda" else None,
    )
    if len(loaders.train_dataset) == 0 or len(loaders.val_dataset) == 0:
        raise DatasetError("no training or no validation image could be decoded; see the WARNING events")
    steps_per_epoch = len(loaders.train)
    if training.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, training.max_steps_per_epoch)
    optimizer = make_optimizer(training, freezing.trainable_parameters(built.model))
    scheduler, per_step = make_scheduler(training, optimizer, steps_per_epoch)
    stopping = spec.early_stopping
    split = freezing.split_frozen_prefix(built.model, plan)
    run = Run(
        spec=spec,
        reporter=reporter,
        device=device,
        splits=splits,
        built=built,
        preprocessing=preprocessing,
        plan=plan,
        forward=_make_forward(built.model, split, training.compile),
        loaders=loaders,
        criterion=task.criterion(training.label_smoothing),
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_per_step=per_step,
        scaler=torch.amp.GradScaler(device.device.type, enabled=device.autocast_dtype == torch.float16),
        early_stopping=EarlyStopping.from_spec(stopping),
        keeper=CheckpointKeeper(
            checkpoint_dir(job_dir),
            stopping.monitor,
            comparator(stopping.resolved_mode),
            spec.checkpointing.keep_top_k,
        ),
        tensorboard=TensorBoardLogger(job_dir / "tensorboard", enabled=False),  # started below
        wandb=WandbLogger(None, reporter),
        model_config=_model_config(spec, built, preprocessing, splits.class_names),
        torch_home=settings.torch_home,
        split=split,
        cache_features=feature_cache.can_cache(spec, split),
    )
    wandb_run_id = _resume(run, resume, last) if resume is not None else None
    run.tensorboard = TensorBoardLogger(job_dir / "tensorboard", enabled=spec.logging.tensorboard)
    run.wandb = WandbLogger.start(
        spec.logging.wandb, job_dir=job_dir, config=spec.to_dict(), run_id=wandb_run_id, reporter=reporter,
        name=spec.name,
    )  # fmt: skip
    telemetry.announce(run)
    return run


def _make_forward(model: nn.Module, split: freezing.FrozenSplit | None, compile_model: bool) -> Forward:
    """The training forward pass: the frozen prefix under no_grad when the model splits exactly."""
    if split is None:
        return torch.compile(model) if compile_model else model  # type: ignore[return-value]

    def forward(images: Tensor) -> Tensor:
        with torch.no_grad():  # no activations kept for a part that gets no gradient
            features = split.prefix(images)
        return split.rest(features)

    return torch.compile(forward) if compile_model else forward  # type: ignore[return-value]


def _model_config(
    spec: JobSpec, built: BuiltModel, preprocessing: Preprocessing, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """What serving needs to rebuild and feed the model: the builder's config plus task, sizes, labels.

    `num_classes` is the head's width (1 for binary: one logit for class_names[1]).
    """
    return {
        **built.model_config,
        "preprocessing": asdict(preprocessing),
        "task": spec.task,
        "image_size": preprocessing.crop_size,
        "resize_size": preprocessing.resize_size,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "interpolation": preprocessing.interpolation,
        "threshold": spec.threshold,
        "class_names": list(class_names),
        "top_k": min(spec.serving.top_k, len(class_names)),
    }


def _resume(run: Run, state: dict[str, Any], path: Path) -> str | None:
    """Restore every piece of training state from `state` (last.pt); returns the W&B run id."""
    if tuple(state["class_names"]) != run.class_names:
        raise FailedPrecondition(
            f"checkpoint {path} has classes {state['class_names']}, but the job's dataset now has "
            f"{list(run.class_names)}; "
            "restore the dataset as it was, or delete the job's checkpoints to start over"
        )
    run.model.load_state_dict(state["model"])
    asked = registry.check_architecture(run.spec.model.architecture)
    if run.built.architecture != asked:
        run.reporter.event(
            EventKind.WARNING,
            f"{path} was written before tuneserve built {asked} for {run.spec.model.architecture!r}: it "
            f"holds {run.built.architecture} with mean {list(run.preprocessing.mean)}, std "
            f"{list(run.preprocessing.std)}, and training continues on that network as it started. "
            f"Submit the job again to fine-tune {asked} with its weights' own normalisation",
            {"checkpoint_architecture": run.built.architecture, "spec_architecture": asked},
        )
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"] is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.early_stopping.load_state_dict(state["early_stopping"])
    run.epoch, run.step, run.history = int(state["epoch"]), int(state["step"]), list(state["history"])
    restore_rng(state["rng"])
    run.keeper.publish(run.epoch, run.history)  # best/top-k files, in case a crash fell between writes
    run.reporter.event(
        EventKind.INFO,
        f"resumed from {path} after epoch {run.epoch}",
        {"epoch": run.epoch, "step": run.step, "path": str(path)},
    )
    return state["wandb_run_id"]


def float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a history row, as floats, without `epoch`."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch"}
