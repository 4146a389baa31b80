"""Fine-tune one job, start to finish: what a job's worker calls.

prepare (service.training.prepare) -> epochs: train, evaluate, checkpoint, early stopping -> the
per-class report on the best weights.

Under DDP (service.training.distributed) every rank runs this: each trains on its shard, gradients are
averaged, validation is sharded and its metrics averaged over the ranks so all hold the same numbers,
rank 0 decides early stopping for all, and rank 0 alone writes checkpoints (the others wait at a
barrier) and logs. World size 1 is the single-process path, unchanged.

A resumed job ends exactly where an uninterrupted one would (on the CPU): each epoch's data order,
augmentation and dropout are seeded from (seed, epoch), and last.pt holds everything else.
On a stop request the job returns "stopped" at once; last.pt still holds the end of the previous
epoch, from which a later run resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from service.records import EventKind
from service.settings import Settings
from service.spec import JobSpec
from service.training import freezing, telemetry
from service.training.checkpoints import capture_rng, load_checkpoint, make_checkpoint
from service.training.distributed import RankReporter, Ranks
from service.training.gate_sample import choose_gate_sample
from service.training.loaders import epoch_seed, in_order
from service.training.loop import EpochPlan, StepAgreement, evaluate, train_one_epoch
from service.training.prepare import prepare
from service.training.reporting import Reporter
from service.training.state import Run, float_metrics

EMBEDDING_IMAGES = 256  # validation images in the embedding projector


@dataclass(frozen=True)
class TrainingOutcome:
    status: Literal["completed", "stopped"]
    best_checkpoint: Path | None
    stop_reason: str | None  # why early stopping ended the job, or why it was asked to stop
    metrics: dict[str, float]  # the best epoch's


def train(
    spec: JobSpec, job_dir: Path, settings: Settings, reporter: Reporter, ranks: Ranks | None = None
) -> TrainingOutcome:
    """Fine-tune `spec` in `job_dir`, resuming from `<job_dir>/checkpoints/last.pt` when it exists;
    `ranks`: this process's place in a DDP job (default: the only process)."""
    run = prepare(spec, job_dir, settings, reporter, ranks)
    try:
        # recorded up front, so the job's result names the promotion gate's images from its first epoch on
        val = run.data.splits.val
        reporter.result(gate_sample=choose_gate_sample(val, settings.data_root, spec.training.seed))
        for epoch in range(run.progress.epoch + 1, spec.training.epochs + 1):
            if run.progress.early_stopping.should_stop:
                break
            with run.group.peers_watched(f"epoch {epoch}"):
                stopped = run_epoch(run, epoch)
            if stopped:
                return _outcome(run, "stopped", stopped)
        return finish(run)
    finally:
        run.sinks.metrics.close()
        run.group.close()


def run_epoch(run: Run, epoch: int) -> str | None:
    """Train and evaluate one epoch, checkpoint it, apply early stopping; the stop reason if asked to stop."""
    spec, reporter, progress, started = run.spec, run.reporter, run.progress, time.monotonic()
    freezing.set_train_mode(run.model, run.network.plan, spec.freeze.batchnorm)
    loader, trainer, holds_images = run.training_batches(epoch)
    # data order and augmentation come from (seed, epoch) in the loaders; dropout from this
    torch.manual_seed(epoch_seed(spec.training.seed, epoch))
    group = run.group
    trained = train_one_epoch(
        trainer, loader, EpochPlan(epoch, progress.step, spec.training.max_steps_per_epoch), reporter,
        log_step=run.sinks.metrics.step, agree=_per_step_agreement(run),
    )  # fmt: skip
    if trained.stopped:
        return trained.stopped
    lr = run.optimisation.lr
    run.optimisation.end_epoch()
    # under DDP the ranks' validation shards differ in length: no stop check (a collective) inside it
    checks = None if group.ranks.distributed else reporter
    evaluated = evaluate(run.model, run.data.loaders.val, run.objective, run.device, reporter=checks)
    if evaluated.stopped:
        return evaluated.stopped
    # every rank reports the same numbers: each metric weighted by what each rank counted
    trained.metrics = group.mean(trained.metrics, trained.steps, "averaging the training metrics")
    evaluated.metrics = group.mean(
        evaluated.metrics, evaluated.accumulator.count, "averaging the validation metrics"
    )
    progress.epoch, progress.step = epoch, progress.step + trained.steps
    # each rank decodes its own shard: rank 0 reports every rank's skipped files
    skipped = group.gather(trained.skipped + evaluated.skipped, "gathering the skipped files")
    telemetry.report_skips(run, skipped, f"epoch {epoch}")
    metrics: dict[str, Any] = {"epoch": epoch}
    metrics |= {f"train_{k}": v for k, v in trained.metrics.items()}
    metrics |= {f"val_{k}": v for k, v in evaluated.metrics.items()}
    metrics |= {"lr": lr, "steps": trained.steps, "epoch_time_s": time.monotonic() - started}
    progress.history.append(metrics)
    monitored = float(metrics.get(spec.early_stopping.monitor, float("nan")))
    # rank 0 decides (the others hold the same numbers; its word keeps them from ever parting ways)
    should_stop = group.from_main(progress.early_stopping.step(monitored, epoch), "early stopping")
    reporter.event(EventKind.EPOCH, _epoch_message(metrics), dict(metrics))

    if run.is_main:
        saved = run.sinks.checkpoints.save(_checkpoint(run, metrics))
        reporter.event(
            EventKind.CHECKPOINT,
            f"epoch {epoch} saved{' (best)' if saved.is_best else ''}",
            {"epoch": epoch, "path": str(saved.path), "is_best": saved.is_best, "metric": monitored},
        )
        first_images = trained.first_images if holds_images else telemetry.first_training_images(run, epoch)
        telemetry.log_epoch(run, epoch, metrics, first_images, evaluated)
    group.barrier(f"waiting for rank 0 to write epoch {epoch}'s checkpoint")
    if should_stop:
        stopping = progress.early_stopping
        reporter.event(
            EventKind.EARLY_STOP,
            f"early stopping at epoch {epoch}: {stopping.reason}",
            {
                "epoch": epoch,
                "monitor": stopping.monitor,
                "best": stopping.best,
                "best_epoch": stopping.best_epoch,
                "patience": stopping.patience,
                "reason": stopping.reason,
            },
        )
    return None


def _per_step_agreement(run: Run) -> StepAgreement | None:
    """Under DDP the stop check and the skip of a batch none of whose images decoded on some rank, agreed
    in one collective per step (prepare wraps the reporter in a RankReporter for every job)."""
    reporter = run.reporter
    if not run.group.ranks.distributed or not isinstance(reporter, RankReporter):
        return None
    return reporter.stop_or_skip


def finish(run: Run) -> TrainingOutcome:
    """Evaluate the best weights once more for the per-class report, confusion matrix and embeddings."""
    spec, reporter, keeper = run.spec, run.reporter, run.sinks.checkpoints
    if not run.is_main:  # rank 0 alone reports; the others are done
        return _outcome(run, "completed", run.progress.early_stopping.reason)
    best_epoch, best_metric, best_metrics = run.best()
    if best_epoch is not None and keeper.best_path.exists():
        run.model.load_state_dict(load_checkpoint(keeper.best_path)["model"])
    head = run.model.get_submodule(run.network.built.head_names[0])
    val = run.data.loaders.val
    if run.group.ranks.distributed:  # the whole validation set, not rank 0's shard
        val = in_order(run.data.loaders.val_dataset, val.batch_size or 1, run.data.loaders.num_workers)
    evaluated = evaluate(run.model, val, run.objective, run.device, keep=EMBEDDING_IMAGES, head=head)
    report = evaluated.accumulator.report(run.class_names)
    reporter.event(
        EventKind.INFO,
        f"per-class report of epoch {best_epoch}: macro F1 {report.macro_f1:.4f}",
        {"report": "per_class", "epoch": best_epoch, **report.as_dict()},
    )
    sink, epoch = run.sinks.metrics, run.progress.epoch
    sink.tensorboard.text("report/per_class", report.as_markdown(), epoch)
    if evaluated.features is not None and evaluated.images is not None and evaluated.targets is not None:
        labels = telemetry.label_names(run, evaluated.targets)
        sink.tensorboard.embedding(
            evaluated.features, labels, evaluated.images, *telemetry.mean_std(run), epoch
        )
    monitor = spec.early_stopping.monitor
    sink.summary(
        telemetry.hparams(run),
        best_metrics,
        {f"best_{monitor}": best_metric, "best_epoch": best_epoch, "val_macro_f1": report.macro_f1},
    )
    reporter.result(
        best_epoch=best_epoch,
        best_metric=best_metric,
        monitor=monitor,
        metrics=best_metrics,
        checkpoint_dir=str(keeper.directory),
        best_checkpoint=str(keeper.best_path) if best_epoch is not None else None,
        class_names=run.class_names,
    )
    return _outcome(run, "completed", run.progress.early_stopping.reason)


def _checkpoint(run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
    optimisation, progress = run.optimisation, run.progress
    scheduler = optimisation.scheduler
    return make_checkpoint(
        model=run.model.state_dict(),
        optimizer=optimisation.optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        scaler=optimisation.scaler.state_dict(),
        epoch=progress.epoch,
        step=progress.step,
        history=progress.history,
        early_stopping=progress.early_stopping.state_dict(),
        rng=capture_rng(),
        spec=run.spec.to_dict(),
        class_names=list(run.class_names),
        wandb_run_id=run.sinks.metrics.wandb_run_id,
        metrics=float_metrics(metrics),
        model_config=run.network.config,
    )


def _epoch_message(metrics: dict[str, Any]) -> str:
    shown = ("train_loss", "val_loss", "val_accuracy")
    return f"epoch {metrics['epoch']}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in shown if k in metrics)


def _outcome(run: Run, status: Literal["completed", "stopped"], reason: str | None) -> TrainingOutcome:
    best_epoch, _, metrics = run.best()
    best_path = run.sinks.checkpoints.best_path
    best = best_path if best_epoch is not None and best_path.exists() else None
    run.reporter.result(epochs_completed=run.progress.epoch, stop_reason=reason)
    return TrainingOutcome(status, best, reason, metrics)
