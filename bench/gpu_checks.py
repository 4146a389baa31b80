"""Issue 17, "Correctness on the GPU": one function per check, each driving the real job code.

Every function takes (scale, workdir, results) and adds pass/fail entries (bench.gpu_data.entry) with the
measured values and the tolerance. Without CUDA (the `--cpu` dry run) the same code runs on the CPU and
the entries that need CUDA say "skipped: no CUDA", keeping the dry-run values for inspection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_data import (
    LITE0,
    ResultFile,
    Scale,
    digits_root,
    entry,
    job_spec,
    passed,
    run_job,
    settings_for,
)

NO_CUDA = "skipped: no CUDA"
ACCURACY_TOLERANCE = 0.01  # the issue's: bf16 vs fp32, and vs the CPU job
LITE0_FROZEN_UNTIL = "blocks.5"  # blocks.6, conv_head and the classifier train: bf16 backward runs
RESUME_TOLERANCE = {"val_accuracy": 0.01, "val_loss_rel": 0.02}  # bf16 on CUDA; exact on the CPU
CACHE_LOSS_TOLERANCE = {"gpu": 1e-2, "cpu": 1e-4}  # relative, per epoch: bf16 vs float32 rounding
PROBABILITY_TOLERANCE = 0.02  # handler bf16 on cuda vs fp32 on CPU, per class probability
GREY_LEVELS = 3


def _lite0_spec(scale: Scale, name: str, precision: str, device: str) -> Any:
    return job_spec(
        name,
        LITE0,
        data="digits",
        epochs=scale.lite0_epochs,
        batch_size=64,
        image_size=scale.digit_size,
        precision=precision,
        device=device,
        weights="DEFAULT",
        until_layer=LITE0_FROZEN_UNTIL,
    )


def _lite0_job(scale: Scale, root: Path, name: str, precision: str, device: str) -> dict[str, Any]:
    _, reporter, seconds = run_job(_lite0_spec(scale, name, precision, device), root, name)
    return {"final": _final(reporter), "plan": reporter.fields.get("device"), "s": round(seconds, 1)}


def _final(reporter: Any) -> dict[str, float]:
    epochs = [data for kind, _, data in reporter.events if kind == "EPOCH"]
    return {k: float(epochs[-1][k]) for k in ("val_accuracy", "val_loss", "train_loss")}


def lite0_digits(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """Lite0 on digits: bf16 + channels_last vs fp32 on the accelerator, vs the CPU job; frozen tensors."""
    root = digits_root(scale, workdir)
    accelerator = "cuda" if scale.cuda else "cpu"
    # bf16 autocast on a CPU without bf16 units is emulated (minutes here): the dry run's "bf16" job is fp32
    low = "bf16" if scale.cuda else "fp32"
    runs: dict[str, Any] = {}
    for name, precision, device in (("lite0-bf16", low, accelerator), ("lite0-fp32", "fp32", accelerator)):
        runs[name] = _lite0_job(scale, root, name, precision, device)
    if scale.cuda:  # the CPU figure is computed in this run, same spec on the CPU
        runs["lite0-cpu"] = _lite0_job(scale, root, "lite0-cpu", "fp32", "cpu")
    else:  # the dry run's fp32 job already ran on the CPU
        runs["lite0-cpu"] = runs["lite0-fp32"]
    bf16, fp32, cpu = (runs[n]["final"]["val_accuracy"] for n in ("lite0-bf16", "lite0-fp32", "lite0-cpu"))
    common = {
        "runs": runs,
        "images": scale.digits,
        "image_size": scale.digit_size,
        "freeze_until": LITE0_FROZEN_UNTIL,
        "epochs": scale.lite0_epochs,
    }
    results.add(
        entry(
            "lite0_bf16_vs_fp32",
            "correctness",
            passed(abs(bf16 - fp32) <= ACCURACY_TOLERANCE),
            values={"bf16_val_accuracy": bf16, "fp32_val_accuracy": fp32, "abs_diff": abs(bf16 - fp32)},
            tolerance=f"|bf16 - fp32| <= {ACCURACY_TOLERANCE}",
            **common,
        )
    )
    results.add(
        entry(
            "lite0_bf16_vs_cpu",
            "correctness",
            passed(bf16 >= cpu - ACCURACY_TOLERANCE),
            values={"bf16_val_accuracy": bf16, "cpu_val_accuracy": cpu},
            tolerance=f"bf16 >= cpu - {ACCURACY_TOLERANCE}",
            cpu_reference="computed in this run" if scale.cuda else "the dry run's fp32 job (on the CPU)",
        )
    )
    results.add(frozen_tensors(root / "jobs" / "lite0-bf16", root))


def frozen_tensors(job_dir: Path, root: Path) -> dict[str, Any]:
    """Every tensor of the frozen blocks in the bf16 job's last checkpoint equals the pretrained one, bit
    for bit (parameters and BatchNorm buffers); at least one trainable tensor moved."""
    from service.spec import ModelSpec
    from service.training.builder import build_model
    from service.training.checkpoints import load_checkpoint

    state = load_checkpoint(job_dir / "checkpoints" / "last.pt")["model"]
    pretrained = build_model(
        ModelSpec(architecture=LITE0, weights="DEFAULT"),
        len(state["classifier.bias"]),
        torch_home=root / "torch",
        load_pretrained=True,
    ).model.state_dict()
    frozen_prefixes = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(6)))
    frozen = [k for k in pretrained if k.startswith(frozen_prefixes)]
    differ = [k for k in frozen if not _bit_equal(state[k], pretrained[k])]
    trainable = [k for k in pretrained if k.startswith(("blocks.6.", "conv_head.")) and k.endswith("weight")]
    moved = [k for k in trainable if not _bit_equal(state[k], pretrained[k])]
    return entry(
        "frozen_bit_identical",
        "correctness",
        passed(bool(frozen) and not differ and bool(moved)),
        values={
            "frozen_tensors": len(frozen),
            "differing": differ[:10],
            "trainable_weights_moved": f"{len(moved)} of {len(trainable)}",
        },
        tolerance="bit-identical (torch.equal, same dtype)",
        job="lite0-bf16",
    )


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def resume_after_sigkill(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """A real worker process SIGKILLed after its first checkpoint, then started again, ends where an
    uninterrupted worker ends."""
    from service.api.reporting_server import start_reporting_server
    from service.jobs.intake import Intake
    from service.jobs.store import JobStore
    from service.records import JobState

    root = digits_root(scale, workdir)
    settings = settings_for(root, max_job_retries=0)
    store = JobStore(settings.jobs_db)
    intake = Intake(store)  # the workers report through the control plane's reporting API, as in the service
    reporting = start_reporting_server(settings, intake)
    spec = job_spec("resume", "resnet18", data="digits", epochs=3, batch_size=64, image_size=scale.digit_size)

    def worker_of(job_id: str) -> subprocess.Popen[bytes]:
        return _worker(settings, job_id, reporting.address, intake.issue(job_id))

    try:
        plain, killed = store.create_job(spec), store.create_job(spec)
        store.transition(plain.id, JobState.RUNNING, "bench")
        exits = {"uninterrupted": worker_of(plain.id).wait()}
        store.transition(killed.id, JobState.RUNNING, "bench")
        worker = worker_of(killed.id)
        killed_after = _kill_after_first_checkpoint(store, killed.id, worker)
        exits["killed"] = worker.wait()
        exits["resumed"] = worker_of(killed.id).wait()
        resumed_events = [e.message for e in store.events_after(killed.id) if e.message.startswith("resumed")]
    finally:
        reporting.stop()
        store.close()
    a, b = (_last_metrics(settings.job_dir(job_id)) for job_id in (plain.id, killed.id))
    if scale.cuda:
        ok = abs(a["val_accuracy"] - b["val_accuracy"]) <= RESUME_TOLERANCE["val_accuracy"] and abs(
            a["val_loss"] - b["val_loss"]
        ) <= RESUME_TOLERANCE["val_loss_rel"] * abs(a["val_loss"])
        tolerance = (
            f"|val_accuracy diff| <= {RESUME_TOLERANCE['val_accuracy']}, |val_loss diff| <= "
            f"{RESUME_TOLERANCE['val_loss_rel']:.0%} (bf16 autocast, cudnn.benchmark)"
        )
    else:
        ok, tolerance = a == b, "exactly equal (fp32 on the CPU)"
    ok = ok and exits["killed"] == -signal.SIGKILL and bool(resumed_events) and killed_after is not None
    results.add(
        entry(
            "resume_after_sigkill",
            "correctness",
            passed(ok),
            tolerance=tolerance,
            values={"uninterrupted": a, "killed_and_resumed": b},
            worker_exits=exits,
            killed_after=killed_after,
            resumed=resumed_events,
            model="resnet18 (random init), 3 epochs",
        )
    )


def _worker(settings: Any, job_id: str, address: str, token: str) -> subprocess.Popen[bytes]:
    from service.jobs.launcher import REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV, worker_env
    from service.jobs.local_launcher import worker_command

    log = (settings.job_dir(job_id)).parent / f"{job_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**worker_env(settings), REPORT_ADDRESS_ENV: address, REPORT_TOKEN_ENV: token}
    with log.open("ab") as out:
        return subprocess.Popen(worker_command(job_id), env=env, stdout=out, stderr=out)


def _kill_after_first_checkpoint(store: Any, job_id: str, worker: subprocess.Popen[bytes]) -> str | None:
    """SIGKILL the worker (its process group) as soon as the epoch-1 checkpoint event is written."""
    seen = 0
    while worker.poll() is None:
        for event in store.events_after(job_id, seen):
            seen = event.seq
            if event.kind == "CHECKPOINT" and event.data.get("epoch") == 1:
                os.killpg(worker.pid, signal.SIGKILL)  # the worker runs in its own session (setsid)
                return event.message
        time.sleep(0.02)
    return None  # it finished first


def _last_metrics(job_dir: Path) -> dict[str, float]:
    from service.training.checkpoints import load_checkpoint

    history = load_checkpoint(job_dir / "checkpoints" / "last.pt")["history"]
    return {k: float(history[-1][k]) for k in ("epoch", "val_accuracy", "val_loss", "train_loss")}


def feature_cache_on_device(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """Head-only job with and without the frozen-feature cache: the same losses (and the speed-up)."""
    from bench import cache_speed

    size = cache_speed.Size(
        scale.speed_model, scale.speed_image, scale.cache_per_class, scale.speed_batch, scale.cache_epochs
    )
    result = cache_speed.run(size, workdir / "cache")
    tolerance = CACHE_LOSS_TOLERANCE[scale.name]
    results.add(
        entry(
            "feature_cache_losses",
            "correctness",
            passed(result["max_rel_loss_diff"] <= tolerance),
            values={"max_rel_loss_diff": result["max_rel_loss_diff"]},
            tolerance=f"relative <= {tolerance}",
            cache_reported=result["cache_reported"],
            model=size.architecture,
        )
    )
    speedup = result["speedup_later_epochs"]
    results.add(
        entry(
            "feature_cache_speed",
            "speed",
            passed(speedup >= result["goal"]),
            ratio=speedup,
            goal=result["goal"],
            values={k: result[k] for k in ("first_epoch_s", "later_epoch_s", "train_images", "image_size")},
            model=size.architecture,
            batch_size=size.batch_size,
        )
    )


def handler_on_cuda(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """handlers.inference.ImageClassifier on cuda (bf16, channels_last) vs the checkpoint in fp32 on the
    CPU, in-process, on digits and real photos: top-1 equal except near-ties, probabilities close."""
    from bench.gpu_data import photo_bytes
    from handlers.inference import ImageClassifier, decode_image
    from service.training.checkpoints import load_checkpoint

    checkpoint_path = _lite0_checkpoint(scale, workdir)
    checkpoint = load_checkpoint(checkpoint_path)
    device = torch.device("cuda" if scale.cuda else "cpu")
    reference = ImageClassifier.from_checkpoint(checkpoint, torch.device("cpu"))
    served = ImageClassifier.from_checkpoint(checkpoint, device)
    requests = [p.read_bytes() for p in sorted((workdir / "data" / "digits").rglob("*.png"))[:256]]
    requests += list(photo_bytes().values())
    batch = torch.stack([reference.transform(decode_image(r, 10**8)) for r in requests])
    expected, got = reference.probabilities(batch), served.probabilities(batch)
    diff = (expected - got).abs()
    top2 = expected.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * PROBABILITY_TOLERANCE
    mismatched = expected.argmax(1) != got.argmax(1)
    ok = float(diff.max()) <= PROBABILITY_TOLERANCE and not bool((mismatched & ~near_tie).any())
    results.add(
        entry(
            "handler_cuda_bf16_vs_cpu_fp32",
            "correctness",
            passed(ok) if scale.cuda else NO_CUDA,
            values={
                "max_abs_prob_diff": float(diff.max()),
                "mean_abs_prob_diff": float(diff.mean()),
                "top1_mismatches": int(mismatched.sum()),
                "of_which_near_ties": int((mismatched & near_tie).sum()),
                "images": len(requests),
            },
            tolerance=f"max |p diff| <= {PROBABILITY_TOLERANCE}; top-1 equal unless the fp32 top-2 margin "
            f"<= {2 * PROBABILITY_TOLERANCE}",
            served_bf16=served.use_bf16,
            served_channels_last=served.channels_last,
            imports_torchserve="ts" in sys.modules,
            checkpoint=str(checkpoint_path.relative_to(workdir)),
        )
    )


def _lite0_checkpoint(scale: Scale, workdir: Path) -> Path:
    """The bf16 Lite0 job's best checkpoint, or a one-epoch job's when that check did not get so far."""
    for name in ("lite0-bf16", "handler-lite0"):
        path = workdir / "jobs" / name / "checkpoints" / "best.pt"
        if path.exists():
            return path
    root = digits_root(scale, workdir)
    spec = job_spec(
        "handler-lite0",
        LITE0,
        data="digits",
        epochs=1,
        batch_size=64,
        image_size=scale.digit_size,
        weights="DEFAULT",
        until_layer="global_pool",
    )
    run_job(spec, root, "handler-lite0")
    return workdir / "jobs" / "handler-lite0" / "checkpoints" / "best.pt"
