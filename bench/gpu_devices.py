"""Issue 17 checks about devices: GPU JPEG decoding vs the handler's PIL path, jobs on several GPUs, DDP.

Same contract as bench.gpu_checks: (scale, workdir, results), entries with values and tolerances.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_data import (
    ResultFile,
    Scale,
    digits_root,
    entry,
    job_spec,
    passed,
    settings_for,
    write_jpeg_folder,
)

NO_CUDA = "skipped: no CUDA"
GREY_LEVELS = 3  # the bound on |GPU decode + resize - PIL decode + resize|


def jpeg_decode(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """service.training.decoding.decode_jpegs on the device vs the handler's decode + resize (PIL): within
    3 grey levels. The decode alone (full size) is compared too, to tell decoder from resize differences."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from bench.gpu_data import photo_bytes
    from handlers.inference import decode_image
    from service.training.architecture import IMAGENET, interpolation_mode
    from service.training.decoding import decode_jpegs
    from service.training.scan import Sample

    folder = write_jpeg_folder(workdir / "jpegs-decode", 48, scale.jpeg_size)
    for name, data in photo_bytes().items():  # the full-size photos, 427x640, as they are
        (folder / "class_0" / name).write_bytes(data)
    paths = sorted(folder.rglob("*.jpg"))
    samples = [Sample(p, 0, Image.open(p).size) for p in paths]
    device = torch.device("cuda" if scale.cuda else "cpu")
    pre = IMAGENET
    mode = interpolation_mode(pre.interpolation)
    decoded = decode_jpegs(samples, pre, device)
    resized, raw = [], []
    for path, ours in zip(paths, decoded, strict=True):
        pil = decode_image(path.read_bytes(), 10**8)  # the handler's decode (PIL, RGB)
        handler = F.pil_to_tensor(F.resize(pil, [pre.resize_size], interpolation=mode, antialias=True))
        if ours is None or ours.shape != handler.shape:
            resized.append(None)
            continue
        resized.append((ours.int() - handler.int()).abs())
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        full = decode_jpeg(data, mode=ImageReadMode.RGB, device=device).cpu()
        raw.append((full.int() - F.pil_to_tensor(pil).int()).abs())
    failed = sum(d is None for d in resized)
    diffs = torch.cat([d.flatten() for d in resized if d is not None]).float()
    raw_diffs = torch.cat([d.flatten() for d in raw]).float()
    ok = failed == 0 and float(diffs.max()) <= GREY_LEVELS
    results.add(
        entry(
            "gpu_jpeg_decode_vs_pil",
            "correctness",
            passed(ok) if scale.cuda else NO_CUDA,
            values={
                "decoded_and_resized": _spread(diffs),
                "decode_only_full_size": _spread(raw_diffs),
                "images": len(paths),
                "not_decoded_or_other_shape": failed,
            },
            tolerance=f"max |diff| <= {GREY_LEVELS} grey levels (resized to {pre.resize_size}, "
            f"{pre.interpolation}, antialias)",
            device=str(device),
            compared_with="handlers.inference.decode_image, then resize of the PIL image",
        )
    )


def _spread(diffs: torch.Tensor) -> dict[str, float]:
    values = diffs.numpy()
    return {
        "max": float(values.max()),
        "p99_9": float(np.percentile(values, 99.9)),
        "mean": round(float(values.mean()), 4),
        "share_over_3": round(float((values > GREY_LEVELS).mean()), 6),
    }


def two_jobs_two_gpus(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """Two jobs queued together through the real scheduler run at once, each on its own GPU (read from the
    worker's CUDA_VISIBLE_DEVICES and, where nvidia-smi exists, from the driver's process list)."""
    gpus = torch.cuda.device_count()
    if scale.cuda and gpus < 2:
        results.add(entry("two_jobs_two_gpus", "correctness", f"skipped: {gpus} GPU on this machine"))
        return
    seen = _run_two_jobs(scale, workdir)
    visible = [w["CUDA_VISIBLE_DEVICES"] for w in seen["workers"]]
    if not scale.cuda:
        status = NO_CUDA
    elif any(v is None for v in visible):
        status = "not available: the scheduler does not assign a GPU per job (no CUDA_VISIBLE_DEVICES)"
    else:
        used = [w.get("gpu_uuids") or w["CUDA_VISIBLE_DEVICES"] for w in seen["workers"]]
        status = passed(seen["overlapped"] and len({str(u) for u in used}) == 2)
    results.add(entry("two_jobs_two_gpus", "correctness", status, values=seen, gpus=gpus))


def _run_two_jobs(scale: Scale, workdir: Path) -> dict[str, Any]:
    from service.api.reporting_server import start_reporting_server
    from service.jobs.intake import Intake
    from service.jobs.local_launcher import LocalProcessLauncher
    from service.jobs.scheduler import Scheduler
    from service.jobs.store import JobStore

    root = digits_root(scale, workdir)
    settings = settings_for(root, max_concurrent_jobs=2, state_dir=root / "two-jobs")
    store = JobStore(settings.jobs_db)
    spec = job_spec("placed", "resnet18", data="digits", epochs=2, batch_size=64, image_size=scale.digit_size)
    jobs = [store.create_job(spec).id for _ in range(2)]
    intake = Intake(store)
    reporting = start_reporting_server(settings, intake)
    scheduler = Scheduler(
        settings, store, LocalProcessLauncher(settings), intake, reporting.address, poll_s=0.1
    )
    workers: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + (25 if scale.cuda else 120)  # within the check's budget
    try:
        scheduler.start()
        while time.monotonic() < deadline and len(workers) < 2:
            for job_id in jobs:
                pid = store.worker_pid(job_id)
                if pid is not None and job_id not in workers:
                    workers[job_id] = _placement(pid)
            time.sleep(0.05)
        overlapped = len(scheduler.running()) == 2
        while torch.cuda.is_available() and time.monotonic() < deadline:  # until both hold CUDA memory
            for worker in workers.values():
                worker["gpu_uuids"] = _gpus_of(worker["pid"])
            if all(w["gpu_uuids"] for w in workers.values()) or shutil.which("nvidia-smi") is None:
                break
            time.sleep(0.5)
        finish_by = min(deadline, time.monotonic() + 20)  # placement is the point; finishing is a bonus
        while time.monotonic() < finish_by and scheduler.running():
            time.sleep(0.2)
    finally:
        scheduler.stop(drain=False)
        reporting.stop()
        states = [str(store.get_job(j).state) for j in jobs]
        store.close()
    return {"workers": list(workers.values()), "overlapped": overlapped, "final_states": states}


def _placement(pid: int) -> dict[str, Any]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {"pid": pid, "CUDA_VISIBLE_DEVICES": None}
    env = dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return {"pid": pid, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES")}


def _gpus_of(pid: int) -> list[str] | None:
    """The GPUs the driver says `pid` holds memory on (nvidia-smi), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"]
    lines = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.splitlines()
    return [uuid.strip() for p, _, uuid in (line.partition(",") for line in lines) if p.strip() == str(pid)]


def ddp(scale: Scale, workdir: Path, results: ResultFile) -> None:
    """N GPUs vs 1 through torchrun and NCCL (bench.ddp_scaling): images/s >= 0.9 x N x 1 GPU. Skipped
    with a note on one GPU; on the CPU dry run two gloo processes take the same path."""
    from bench import ddp_scaling

    world, skip = ddp_scaling.plan(scale.cuda, torch.cuda.device_count())
    if skip is not None:
        results.add(skip)
        return
    size = ddp_scaling.GPU_SIZE if scale.cuda else ddp_scaling.CPU_SIZE
    results.add(ddp_scaling.compare(size, workdir / "ddp", world, scale.cuda))
