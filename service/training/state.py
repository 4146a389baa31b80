"""A training run's state, grouped by what changes together: the network, the data, what judges and
updates it (service.training.steps), the progress so far, and where results go.

service.training.prepare builds a Run (restored from last.pt on resume); service.training.runner
advances it one epoch at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from service.records import EventKind
from service.spec import JobSpec
from service.tasks import TaskStrategy
from service.training import feature_cache, freezing, telemetry
from service.training.architecture import Preprocessing
from service.training.builder import BuiltModel
from service.training.checkpoints import CheckpointKeeper
from service.training.distributed import Group, Ranks
from service.training.early_stopping import EarlyStopping
from service.training.loaders import Loader, Loaders, set_epoch
from service.training.reporting import Reporter
from service.training.scan import Splits
from service.training.sink import MetricsSink
from service.training.steps import DevicePlan, Forward, Objective, Optimisation, Trainer


@dataclass
class Network:
    """The model being fine-tuned, how it was built and frozen, and how its forward pass runs."""

    built: BuiltModel
    preprocessing: Preprocessing
    plan: freezing.FreezePlan
    forward: Forward  # the training forward pass (the frozen prefix under no_grad when it splits)
    split: freezing.FrozenSplit | None  # the frozen prefix and the rest, when the model splits
    config: dict[str, Any]  # what serving needs to rebuild it: saved with every checkpoint
    torch_home: Path  # for the layer table
    # the rest after the split as training runs it: split.rest, or under DDP the rest inside
    # DistributedDataParallel (its gradients averaged over the ranks); None when there is no split
    rest: Forward | None = None

    @property
    def model(self) -> nn.Module:
        return self.built.model


@dataclass
class Data:
    """The job's images: the splits, their loaders and, when the prefix's outputs can be cached, those."""

    splits: Splits
    loaders: Loaders
    cache_features: bool = False  # train on cached prefix outputs (see service.training.feature_cache)
    feature_loader: Loader | None = None  # built at the first epoch that needs it


@dataclass
class Progress:
    """How far the run is: what a checkpoint restores besides the weights and the optimiser."""

    early_stopping: EarlyStopping
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    reported_skips: set[Path] = field(default_factory=set)


@dataclass(frozen=True)
class Sinks:
    """Where a run's results go: events to the reporter, numbers to the metrics sink, weights to files."""

    reporter: Reporter
    metrics: MetricsSink
    checkpoints: CheckpointKeeper


@dataclass
class Run:
    """Everything one training run holds, built by prepare() and advanced by run_epoch()."""

    spec: JobSpec
    device: DevicePlan
    network: Network
    data: Data
    objective: Objective
    optimisation: Optimisation
    progress: Progress
    sinks: Sinks
    group: Group = field(default_factory=lambda: Group(Ranks()))  # the job's ranks (world size 1: none)

    @property
    def model(self) -> nn.Module:
        return self.network.model

    @property
    def is_main(self) -> bool:
        """The rank that reports and writes (checkpoints, TensorBoard, W&B); the only one at world size 1."""
        return self.group.ranks.is_main

    @property
    def reporter(self) -> Reporter:
        return self.sinks.reporter

    @property
    def task(self) -> TaskStrategy:
        return self.objective.task

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        return self.task.output_units(self.num_classes)

    def training_batches(self, epoch: int) -> tuple[Loader, Trainer, bool]:
        """This epoch's training loader and trainer, and whether its batches hold images: cached prefix
        outputs through the rest of the network when they can be cached, else images."""
        data, network = self.data, self.network
        if data.cache_features and network.split is not None:
            if data.feature_loader is None:
                data.feature_loader = self._cache_features()
            if data.feature_loader is not None:
                set_epoch(data.feature_loader, epoch)
                return data.feature_loader, self.trainer(network.rest or network.split.rest), False
        data.loaders.set_epoch(epoch)
        return data.loaders.train, self.trainer(network.forward), True

    def trainer(self, forward: Forward) -> Trainer:
        return Trainer(forward, self.objective, self.optimisation, self.device)

    def _cache_features(self) -> Loader | None:
        split, loaders = self.network.split, self.data.loaders
        assert split is not None
        started = time.monotonic()
        loader, skipped = feature_cache.cache_features(
            split, loaders.train_dataset, self.device, batch_size=self.spec.training.batch_size,
            seed=self.spec.training.seed, num_workers=loaders.num_workers, group=self.group,
        )  # fmt: skip
        telemetry.report_skips(self, skipped, "the frozen-feature pass")
        if loader is None:
            self.data.cache_features = False
            return None
        self.reporter.event(
            EventKind.INFO,
            f"cached the frozen blocks' outputs for {len(loader.dataset)} images "  # type: ignore[arg-type]
            f"in {time.monotonic() - started:.1f} s; epochs now run only the trainable blocks",
            {"feature_cache": True, "images": len(loader.dataset)},  # type: ignore[arg-type]
        )
        return loader

    def best(self) -> tuple[int | None, float | None, dict[str, float]]:
        history = self.progress.history
        ranked = self.sinks.checkpoints.rank(history)
        if not ranked:
            return None, None, float_metrics(history[-1]) if history else {}
        epoch, metric = ranked[0]
        return epoch, metric, float_metrics(next(h for h in history if h["epoch"] == epoch))


def float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a history row, as floats, without `epoch`."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch"}
