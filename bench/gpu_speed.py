"""Issue 17, "Speed": ratios measured in one process, with the absolute figures for the record.

Same contract as bench.gpu_checks: (scale, workdir, results). The loop comparisons reuse
bench.loop_speed (our job's loop vs a hand-written PyTorch loop); the data-path and sync checks build a
real job's Run with service.training.prepare.prepare and time train_one_epoch on it.
"""

from __future__ import annotations

import time
import traceback
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.common import median, ratio, timed
from bench.gpu_data import ResultFile, Scale, entry, job_spec, passed, settings_for, write_jpeg_folder

LOOP_GOAL = 0.97
REAL_DATA_GOAL = 0.9
NO_CUDA = "skipped: no CUDA"


def loop_vs_plain(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """Our loop vs the plain loop, full fine-tune and frozen through layer3 (bench.loop_speed)."""
    from bench import loop_speed

    size = loop_speed.Size(
        scale.speed_model, scale.speed_image, scale.speed_batch, scale.loop_steps, scale.loop_rounds
    )
    result = loop_speed.run(size)
    for case in ("full", "frozen"):
        figures = result[case]
        results.add(
            entry(
                f"loop_speed_{case}",
                "speed",
                passed(figures["ratio"] >= LOOP_GOAL),
                ratio=figures["ratio"],
                goal=LOOP_GOAL,
                values=figures,
                plan=result["plan"],
                model=size.architecture,
                batch_size=size.batch_size,
                image_size=size.image_size,
                reference_h200_plain_img_per_s={"full": 4700, "frozen": 13042}[case],
            )
        )


def compile_vs_eager(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """`training.compile: true`: first-step time and steady images/s of our loop, compiled vs eager."""
    from bench import loop_speed
    from service.spec import FreezeSpec, TrainingSpec
    from service.training.optim import select_device

    if "compile" not in TrainingSpec.model_fields:
        results.add(entry("compile_vs_eager", "speed", "not supported by the spec"))
        return
    size = loop_speed.Size(scale.speed_model, scale.speed_image, scale.speed_batch, scale.speed_steps, 3)
    plan = select_device(TrainingSpec(optimizer="sgd", scheduler="none"), loop_speed._model(size))
    batches = loop_speed._batches(size, plan.device.type == "cuda")
    figures: dict[str, Any] = {}
    for mode in ("eager", "compiled"):
        epoch = loop_speed._ours(size, plan, FreezeSpec(), compile_model=mode == "compiled")
        first = timed(partial(epoch, batches[:1]))  # compiling happens in here
        epoch(batches[:2])  # a compiled graph may recompile once (dynamic shapes after the first call)
        steady = [timed(partial(epoch, batches)) for _ in range(size.rounds)]
        figures[mode] = {
            "first_step_s": round(first, 2),
            "steady_img_per_s": round(size.batch_size * len(batches) / median(steady), 1),
        }
        results.add(entry(f"compile_{mode}_partial", "speed", "measured", values=figures[mode]))
    results.add(
        entry(
            "compile_vs_eager",
            "speed",
            "measured",
            ratio=round(
                ratio(figures["compiled"]["steady_img_per_s"], figures["eager"]["steady_img_per_s"]), 4
            ),
            values=figures,
            plan=plan.describe(),
            model=size.architecture,
            batch_size=size.batch_size,
            reference_h200_plain_compiled_img_per_s=6896,
        )
    )


def _jpeg_run(scale: Scale, workdir: Path, augmentation: str) -> tuple[Any, float]:
    """A real job's Run over an ImageFolder of JPEGs (decoded on the GPU when there is one)."""
    from service.training.prepare import prepare
    from service.training.reporting import CollectingReporter

    folder = workdir / "data" / "jpegs"
    if not folder.exists():
        partial_folder = write_jpeg_folder(workdir / "data" / "jpegs-partial", scale.jpegs, scale.jpeg_size)
        partial_folder.rename(folder)
    spec = job_spec(
        "jpegs",
        scale.speed_model,
        data="jpegs",
        epochs=3,
        batch_size=scale.speed_batch,
        image_size=scale.speed_image,
        augmentation=augmentation,
    )
    started = time.monotonic()
    job_dir = workdir / "jobs" / f"jpegs-{augmentation}"
    run = prepare(spec, job_dir, settings_for(workdir), CollectingReporter())
    return run, time.monotonic() - started


def _epoch(run: Any, loader: Any, epoch: int, max_steps: int | None = None) -> Any:
    from service.training import freezing
    from service.training.loop import EpochPlan, train_one_epoch

    freezing.set_train_mode(run.model, run.network.plan, run.spec.freeze.batchnorm)
    trainer = run.trainer(run.network.forward)
    return train_one_epoch(trainer, loader, EpochPlan(epoch, 0, max_steps), run.reporter)


def real_jpegs_vs_synthetic(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """Images/s of the job's data path (GPU decode once, then loader + loop) vs the same loop on
    synthetic tensors already on the GPU."""
    run, prepare_s = _jpeg_run(scale, workdir, "light")
    images = len(run.data.loaders.train_dataset)
    _epoch(run, _loader(run, 1), 1)  # warm-up: cudnn search, loader workers
    real_s = [timed(partial(_epoch, run, _loader(run, e), e)) for e in (2, 3)]
    steps = len(run.data.loaders.train)
    shape = (scale.speed_batch, 3, scale.speed_image, scale.speed_image)
    memory_format = torch.channels_last if run.device.channels_last else torch.contiguous_format
    synthetic = [
        (
            torch.randn(shape, device=run.device.device).contiguous(memory_format=memory_format),
            torch.randint(0, run.num_classes, (scale.speed_batch,), device=run.device.device),
            [],
        )
        for _ in range(steps)
    ]
    synthetic_s = [timed(partial(_epoch, run, synthetic, e)) for e in (2, 3)]
    real_ips = images / median(real_s)
    synthetic_ips = steps * scale.speed_batch / median(synthetic_s)
    ok = ratio(real_ips, synthetic_ips) >= REAL_DATA_GOAL
    results.add(
        entry(
            "real_jpegs_vs_synthetic",
            "speed",
            passed(ok) if scale.cuda else NO_CUDA,
            ratio=round(ratio(real_ips, synthetic_ips), 4),
            goal=REAL_DATA_GOAL,
            values={
                "real_img_per_s": round(real_ips, 1),
                "synthetic_img_per_s": round(synthetic_ips, 1),
                "train_images": images,
                "jpegs": scale.jpegs,
                "jpeg_size": scale.jpeg_size,
                "prepare_s_scan_decode_build": round(prepare_s, 2),
                "loader_workers": run.data.loaders.num_workers,
            },
            plan=run.device.describe(),
            model=scale.speed_model,
            augmentation="light",
        )
    )


def _loader(run: Any, epoch: int) -> Any:
    run.data.loaders.set_epoch(epoch)
    return run.data.loaders.train


def host_syncs(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """Host-device synchronisations per training step, counted with torch.cuda.set_sync_debug_mode("warn"),
    grouped by where they come from (the innermost frame in our code, and the frame that called torch)."""
    run, _ = _jpeg_run(scale, workdir, "none")
    _epoch(run, _loader(run, 1), 1, max_steps=2)  # warm-up, not counted
    if not scale.cuda:
        steps = _epoch(run, _loader(run, 2), 2, max_steps=3).steps
        results.add(entry("host_syncs_per_step", "speed", NO_CUDA, values={"dry_run_steps": steps}))
        return
    where: dict[str, int] = {}

    def record(message: Any, category: Any, filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if "/service/" in f.filename]
        key = f"{filename}:{lineno}" + (
            f" <- {ours[-1].filename.split('/service/')[-1]}:{ours[-1].lineno}" if ours else ""
        )
        where[key] = where.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = _epoch(run, _loader(run, 2), 2).steps
        finally:
            torch.cuda.set_sync_debug_mode(0)
    total = sum(where.values())
    results.add(
        entry(
            "host_syncs_per_step",
            "speed",
            "measured",
            values={
                "syncs": total,
                "steps": steps,
                "per_step": round(total / max(1, steps), 2),
                "where": dict(sorted(where.items(), key=lambda kv: -kv[1])),
            },
            note="counted over one epoch of a real job's loop (loader + train_one_epoch); the goal is none "
            "in the hot loop",
        )
    )
