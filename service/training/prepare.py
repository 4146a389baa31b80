"""Build a training run: everything before the first epoch, restored from last.pt on resume.

prepare() reads top-down as the set-up happens: seed -> scan the data -> (load last.pt) -> build the
model -> freeze -> device -> loaders -> optimizer and scheduler -> restore -> open the metrics sink.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from service.errors import DatasetError, FailedPrecondition
from service.records import EventKind
from service.settings import Settings
from service.spec import JobSpec, LoggingSpec, WandbSpec
from service.tasks import TOP_K, task_for
from service.training import feature_cache, freezing, registry, telemetry
from service.training.architecture import Preprocessing
from service.training.builder import BuiltModel, build_model, rebuild_model
from service.training.checkpoints import (
    CheckpointKeeper,
    checkpoint_dir,
    discard_partial_writes,
    load_checkpoint,
    restore_rng,
)
from service.training.distributed import (
    Group,
    RankReporter,
    Ranks,
    check_sync_batchnorm,
    convert_sync_batchnorm,
)
from service.training.early_stopping import EarlyStopping, comparator
from service.training.loaders import build_loaders
from service.training.optim import make_optimizer, make_scheduler, seed_everything, select_device
from service.training.reporting import Reporter
from service.training.scan import load_splits
from service.training.sink import MetricsSink
from service.training.state import Data, Network, Progress, Run, Sinks
from service.training.steps import Forward, Objective, Optimisation
from service.training.weights import FILE, resolve_weights


def prepare(
    spec: JobSpec, job_dir: Path, settings: Settings, reporter: Reporter, ranks: Ranks | None = None
) -> Run:
    """Seed, scan the data, build and freeze the model, set up optimisation; resume when last.pt exists.

    Under DDP (`ranks` from torchrun) every rank runs this and loads last.pt; the process group is
    joined once the device is known, and from then on only rank 0 reports."""
    ranks = ranks or Ranks()
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
    if resume is not None:
        _check_same_classes(resume, splits.class_names, last)
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
    # before freezing: the freeze plan holds the model's modules, and this replaces its BatchNorm layers
    synced = convert_sync_batchnorm(built.model) if training.sync_batchnorm and ranks.distributed else 0
    plan = freezing.apply_freeze(built.model, spec.freeze, built.head_names, architecture=built.architecture)
    device = select_device(training, built.model)
    group = Group(ranks, settings.collective_timeout_s).start(device.device.type)
    if training.sync_batchnorm:
        check_sync_batchnorm(group)
    reporter = RankReporter(reporter, group)
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
        rank=ranks.rank,
        world_size=ranks.world_size,
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
    if ranks.distributed and spec.freeze.batchnorm != "eval":
        # frozen BatchNorm in train mode: DDP over the whole model keeps the prefix's running
        # statistics as rank 0's (broadcast each step); a prefix run apart would let them drift per rank
        split = None
    rest = _trainable_rest(split, group)
    network = Network(
        built=built,
        preprocessing=preprocessing,
        plan=plan,
        forward=_make_forward(built.model, split, rest, group, training.compile),
        split=split,
        config=_model_config(spec, built, preprocessing, splits.class_names),
        torch_home=settings.torch_home,
        rest=rest,
    )
    optimisation = Optimisation(
        optimizer,
        torch.amp.GradScaler(device.device.type, enabled=device.autocast_dtype == torch.float16),
        scheduler,
        per_step,
    )
    progress = Progress(EarlyStopping.from_spec(stopping))
    keeper = CheckpointKeeper(
        checkpoint_dir(job_dir),
        stopping.monitor,
        comparator(stopping.resolved_mode),
        spec.checkpointing.keep_top_k,
    )
    if resume is not None:
        _restore(resume, network, optimisation, progress)
        if network.built.architecture != (asked := registry.check_architecture(spec.model.architecture)):
            _warn_old_network(reporter, last, spec, network, asked)
        # best/top-k files, in case a crash fell between writes (rank 0 writes; the others read)
        if ranks.is_main:
            keeper.publish(progress.epoch, progress.history)
        reporter.event(
            EventKind.INFO,
            f"resumed from {last} after epoch {progress.epoch}",
            {"epoch": progress.epoch, "step": progress.step, "path": str(last)},
        )
    # opened once, after the restore: a resumed job continues the W&B run its checkpoint names
    metrics = MetricsSink.open(
        spec if ranks.is_main else _without_loggers(spec),
        job_dir,
        reporter,
        wandb_run_id=resume["wandb_run_id"] if resume is not None else None,
    )
    cache_features = feature_cache.can_cache(spec, split)
    run = Run(
        spec=spec,
        device=device,
        network=network,
        data=Data(splits, loaders, cache_features=cache_features),
        objective=Objective(
            task, task.criterion(training.label_smoothing), len(splits.class_names), spec.threshold
        ),
        optimisation=optimisation,
        progress=progress,
        sinks=Sinks(reporter, metrics, keeper),
        group=group,
    )
    telemetry.announce(run)
    if ranks.distributed:
        per_rank = training.batch_size // ranks.world_size
        reporter.event(
            EventKind.INFO,
            f"DDP over {ranks.world_size} processes ({group.backend}): {per_rank} images per process "
            f"per step, global batch {training.batch_size}"
            + (f"; {synced} BatchNorm layers synchronised (SyncBatchNorm)" if synced else ""),
            {
                "world_size": ranks.world_size,
                "backend": group.backend,
                "batch_per_rank": per_rank,
                "sync_batchnorm_layers": synced,
            },
        )
    return run


def _without_loggers(spec: JobSpec) -> JobSpec:
    """The spec as a rank other than 0 logs it: neither TensorBoard nor W&B (rank 0 writes both)."""
    quiet = LoggingSpec(tensorboard=False, wandb=WandbSpec(mode="disabled"))
    return spec.model_copy(update={"logging": quiet})


def _trainable_rest(split: freezing.FrozenSplit | None, group: Group) -> Forward | None:
    """What trains after the split: its layers, under DDP as one module in DistributedDataParallel (the
    prefix has no gradient to average, and cached features enter here)."""
    if split is None:
        return None
    if not group.ranks.distributed:
        return split.rest
    return group.wrap(freezing.TrainablePart(split.rest))


def _make_forward(
    model: nn.Module,
    split: freezing.FrozenSplit | None,
    rest: Forward | None,
    group: Group,
    compile_model: bool,
) -> Forward:
    """The training forward pass: the frozen prefix under no_grad when the model splits exactly."""
    if split is None or rest is None:
        whole = group.wrap(model)
        return torch.compile(whole) if compile_model else whole  # type: ignore[return-value]

    def forward(images: Tensor) -> Tensor:
        with torch.no_grad():  # no activations kept for a part that gets no gradient
            features = split.prefix(images)
        return rest(features)

    return torch.compile(forward) if compile_model else forward  # type: ignore[return-value]


def _model_config(
    spec: JobSpec, built: BuiltModel, preprocessing: Preprocessing, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """What serving needs to rebuild and feed the model: the builder's config plus task, sizes, labels.

    `num_classes` is the head's width (the task's output units: 1 for binary, one logit for class_names[1]).
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


def _check_same_classes(state: dict[str, Any], class_names: tuple[str, ...], path: Path) -> None:
    if tuple(state["class_names"]) != class_names:
        raise FailedPrecondition(
            f"checkpoint {path} has classes {state['class_names']}, but the job's dataset now has "
            f"{list(class_names)}; "
            "restore the dataset as it was, or delete the job's checkpoints to start over"
        )


def _restore(state: dict[str, Any], network: Network, optimisation: Optimisation, progress: Progress) -> None:
    """Restore every piece of training state from `state` (last.pt)."""
    network.model.load_state_dict(state["model"])
    optimisation.optimizer.load_state_dict(state["optimizer"])
    if optimisation.scheduler is not None and state["scheduler"] is not None:
        optimisation.scheduler.load_state_dict(state["scheduler"])
    optimisation.scaler.load_state_dict(state["scaler"])
    progress.early_stopping.load_state_dict(state["early_stopping"])
    progress.epoch, progress.step = int(state["epoch"]), int(state["step"])
    progress.history = list(state["history"])
    restore_rng(state["rng"])


def _warn_old_network(reporter: Reporter, path: Path, spec: JobSpec, network: Network, asked: str) -> None:
    """A checkpoint of a network the spec's name no longer builds (the builtin Lite0 before its fix)."""
    built = network.built
    reporter.event(
        EventKind.WARNING,
        f"{path} was written before tuneserve built {asked} for {spec.model.architecture!r}: it "
        f"holds {built.architecture} with mean {list(network.preprocessing.mean)}, std "
        f"{list(network.preprocessing.std)}, and training continues on that network as it started. "
        f"Submit the job again to fine-tune {asked} with its weights' own normalisation",
        {"checkpoint_architecture": built.architecture, "spec_architecture": asked},
    )
