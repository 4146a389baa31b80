"""Benchmark 10: the same fine-tune as a tuneserve job and as a plain Lightning script, in one run.

  python -m bench.lightning_compare [--quick]

Two cases: `full` (nothing frozen) and `head_only` (everything up to the classifier frozen: tuneserve's
feature cache applies). Each case runs the same network, starting weights, data, split, freeze, epochs,
batch, seed, optimizer and lr both ways, one after the other, from this process:
  tuneserve  a job submitted over gRPC to a real `tuneserve serve` (child process, TorchServe off, its
             spare worker ready as in steady state), timed from CreateJob to its last epoch's
             CHECKPOINT event;
  lightning  `python -m bench.lightning_finetune` (child process: Trainer + BaseFinetuning +
             ModelCheckpoint), timed from its start (imports included) to the end of fit().
The data: scikit-learn's digits as PNGs in a train and a val folder (a fixed stratified split both read).
Both sides run one torch thread and no loader workers; neither logs to TensorBoard or W&B. `ratio` is
Lightning's seconds over tuneserve's (above 1: tuneserve is faster). Goals (issue 16): full >= 1,
head-only >= 3, at equal validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import emit, free_ports, ratio
from bench.gpu_data import digits
from bench.service_run import wait_healthy, wait_spares
from service.jobs.local_launcher import SPARE_LOG

NAME = "lightning_compare"
ARCHITECTURE = "tf_efficientnet_lite0"  # real ImageNet weights that work offline (a pip package)
CASES = {"full": None, "head_only": "global_pool"}  # freeze until this block (None: nothing)
GOALS = {"full": 1.0, "head_only": 3.0}
THREADS = 1  # the shared CPUs here: one thread per process runs far faster (as bench.service_run)


@dataclass(frozen=True)
class Size:
    digits: int  # of scikit-learn's 1,797
    image_size: int
    batch_size: int
    epochs: int  # the full fine-tune's
    head_epochs: int  # the head-only one's (a head alone takes more epochs to learn; cheap with the cache)
    lr: float = 1e-3
    optimizer: str = "adamw"
    seed: int = 0
    val_fraction: float = 0.2


QUICK = Size(digits=120, image_size=32, batch_size=16, epochs=1, head_epochs=2)
FULL = Size(digits=1000, image_size=32, batch_size=32, epochs=2, head_epochs=8)


def run(
    size: Size, workdir: Path | None = None, timeout_s: float = 1800.0, cases: tuple[str, ...] = tuple(CASES)
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as tmp:
        root = Path(workdir or tmp)
        train_count, val_count = write_digit_split(root / "data" / "digits", size)
        out: dict[str, Any] = {
            "benchmark": NAME,
            "model": ARCHITECTURE,
            "weights": "DEFAULT (ImageNet)",
            "train_images": train_count,
            "val_images": val_count,
            **{
                k: v
                for k, v in asdict(size).items()
                if k not in ("digits", "val_fraction", "epochs", "head_epochs")
            },
            "threads": THREADS,
            "num_workers": 0,
        }
        with running_service(root, timeout_s) as (jobs, pb):
            for done, case in enumerate(cases, start=1):
                until_layer = CASES[case]
                epochs = size.head_epochs if until_layer else size.epochs
                ours = tuneserve_job(jobs, pb, size, until_layer, epochs, timeout_s)
                # the job's hand-over started the next spare: its imports must not run while Lightning's do
                wait_spares(root / "state" / SPARE_LOG, wanted=done + 1, timeout_s=timeout_s)
                theirs = lightning_script(root, size, until_layer, epochs, case, timeout_s)
                out[case] = {"epochs": epochs, **compare(ours, theirs, GOALS[case])}
    return out


def compare(ours: dict[str, Any], theirs: dict[str, Any], goal: float) -> dict[str, Any]:
    return {
        "tuneserve_s": round(ours["seconds"], 3),
        "lightning_s": round(theirs["seconds"], 3),
        "ratio": round(ratio(theirs["seconds"], ours["seconds"]), 3),
        "goal": goal,
        # the script's start and imports left out (a service has made them before the job comes)
        "ratio_without_imports": round(
            ratio(theirs["seconds"] - theirs["parts"]["start_and_imports"], ours["seconds"]), 3
        ),
        "tuneserve_val_accuracy": round(ours["val_accuracy"], 4),
        "lightning_val_accuracy": round(theirs["val_accuracy"], 4),
        "accuracy_diff": round(ours["val_accuracy"] - theirs["val_accuracy"], 4),
        "tuneserve_parts_s": ours["parts"],
        "lightning_parts_s": theirs["parts"],
        "feature_cache": ours["feature_cache"],
    }


def write_digit_split(folder: Path, size: Size) -> tuple[int, int]:
    """folder/{train,val}/<digit>/<i>.png: a seeded `val_fraction` of each class held out, the rest trains."""
    images, labels = digits()
    images, labels = images[: size.digits], labels[: size.digits]
    rng = np.random.default_rng(size.seed)
    counts = {"train": 0, "val": 0}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out = max(1, round(len(members) * size.val_fraction))
        for rank, index in enumerate(members):
            split = "val" if rank < held_out else "train"
            grey = (255 - images[index] * (255 / 16)).astype(np.uint8)
            picture = Image.fromarray(grey).resize((size.image_size,) * 2, Image.Resampling.BICUBIC)
            path = folder / split / str(label) / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.convert("RGB").save(path)
            counts[split] += 1
    return counts["train"], counts["val"]


# ---------------------------------------------------------------- tuneserve: a job through the service


@contextmanager
def running_service(root: Path, timeout_s: float) -> Iterator[tuple[Any, Any]]:
    """A `tuneserve serve` child (TorchServe off) whose spare worker is ready: (FineTuning stub, pb)."""
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc

    (port,) = free_ports(1)
    env = {**_child_env(), "TUNESERVE_PORT": str(port), **_service_folders(root)}
    env |= {"TUNESERVE_MAX_CONCURRENT_JOBS": "1", "TUNESERVE_TORCHSERVE_ENABLED": "false"}
    log = open(root / "service.log", "wb")  # noqa: SIM115  # closed below, after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve", "--log-level", "WARNING"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            wait_healthy(channel, timeout_s)
            wait_spares(root / "state" / SPARE_LOG, wanted=1, timeout_s=timeout_s)
            yield pb_grpc.FineTuningStub(channel), pb
    except BaseException:
        log.flush()
        sys.stderr.write((root / "service.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def tuneserve_job(
    jobs: Any, pb: Any, size: Size, until_layer: str | None, epochs: int, timeout_s: float
) -> dict[str, Any]:
    """Submit the fine-tune, watch it to its end: seconds to the last checkpoint, its val accuracy."""
    spec = pb.JobSpec(name=f"bench-lightning-{'head' if until_layer else 'full'}")
    spec.model.architecture, spec.model.weights = ARCHITECTURE, "DEFAULT"
    spec.data.path, spec.data.val_path, spec.data.num_workers = "digits/train", "digits/val", 0
    if until_layer:
        spec.freeze.until_layer, spec.freeze.batchnorm = until_layer, "eval"
    training = spec.training
    training.epochs, training.batch_size, training.image_size = epochs, size.batch_size, size.image_size
    training.optimizer, training.lr, training.weight_decay = size.optimizer, size.lr, 0.0
    training.scheduler, training.augmentation, training.seed = "none", "none", size.seed
    training.device, training.precision, training.feature_cache = "cpu", "fp32", True
    spec.early_stopping.enabled = False
    spec.logging.tensorboard = False
    spec.logging.wandb.mode = "disabled"
    spec.serving.enabled = False
    submitted = time.time()
    job_id = jobs.CreateJob(pb.CreateJobRequest(spec=spec)).id
    marks: dict[str, float] = {}
    val_accuracy, cached = float("nan"), False
    for event in jobs.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout_s):
        at = event.time.seconds + event.time.nanos / 1e9
        if event.kind == "PROGRESS":
            marks.setdefault("first_step", at)
        if event.kind == "INFO" and "feature_cache" in event.data and event.data["feature_cache"]:
            cached = True
        if event.kind == "EPOCH":
            val_accuracy = float(event.data["val_accuracy"])
        if event.kind == "CHECKPOINT":
            marks["checkpoint"] = at
    job = jobs.GetJob(pb.GetJobRequest(job_id=job_id))
    if job.state != pb.SUCCEEDED:
        raise RuntimeError(f"the tuneserve job ended {pb.JobState.Name(job.state)}: {job.error}")
    return {
        "seconds": marks["checkpoint"] - submitted,
        "val_accuracy": val_accuracy,
        "feature_cache": cached,
        "parts": _rounded(
            to_first_step=marks["first_step"] - submitted, training=marks["checkpoint"] - marks["first_step"]
        ),
    }


# ---------------------------------------------------------------- Lightning: the plain script


def lightning_script(
    root: Path, size: Size, until_layer: str | None, epochs: int, case: str, timeout_s: float
) -> dict[str, Any]:
    config = {
        "architecture": ARCHITECTURE,
        "weights": "DEFAULT",
        "torch_home": str(root / "torch"),
        "train_dir": str(root / "data" / "digits" / "train"),
        "val_dir": str(root / "data" / "digits" / "val"),
        "until_layer": until_layer,
        "image_size": size.image_size,
        "batch_size": size.batch_size,
        "epochs": epochs,
        "optimizer": size.optimizer,
        "lr": size.lr,
        "seed": size.seed,
        "device": "cpu",
        "num_workers": 0,
        "threads": THREADS,
        "checkpoint_dir": str(root / "lightning" / case),
    }
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "bench.lightning_finetune", json.dumps(config)],
        env=_child_env(), capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the Lightning script failed ({done.returncode}): {done.stderr[-3000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(marks["checkpoint"]).is_file():
        raise RuntimeError(f"the Lightning script wrote no checkpoint ({marks['checkpoint']!r})")
    return {
        "seconds": marks["fit_done_at"] - started,
        "val_accuracy": float(marks["val_accuracy"]),
        "parts": _rounded(
            start_and_imports=marks["imports_done_at"] - started,
            build=marks["fit_started_at"] - marks["imports_done_at"],
            fit=marks["fit_done_at"] - marks["fit_started_at"],
        ),
    }


def _child_env() -> dict[str, str]:
    # PYTHONPATH: the children import bench and service from this checkout, as this process does
    here = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": path}


def _service_folders(root: Path) -> dict[str, str]:
    return {
        "TUNESERVE_STATE_DIR": str(root / "state"),
        "TUNESERVE_DATA_ROOT": str(root / "data"),
        "TUNESERVE_TORCH_HOME": str(root / "torch"),
    }


def _rounded(**seconds: float) -> dict[str, float]:
    return {name: round(value, 3) for name, value in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few digits, one epoch: the shape only")
    parser.add_argument("--case", action="append", choices=tuple(CASES), help="only this case (repeatable)")
    parser.add_argument("--seed", type=int, help="another seed (the split, the head, the batch order)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.seed is not None:
        size = replace(size, seed=args.seed)
    emit(run(size, cases=tuple(args.case or CASES)))


if __name__ == "__main__":
    main()
