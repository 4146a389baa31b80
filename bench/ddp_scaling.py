"""DDP scaling on one machine: a job on N GPUs (torchrun, NCCL) against the same job on 1 GPU.

Weak scaling, as a user scales out: each GPU keeps its batch (the global batch is N x per_gpu_batch),
the data and the number of epochs stay. Both runs go through torchrun (`python -m torch.distributed.run
--standalone`) and the real engine (service.training.runner.train, one process per GPU, NCCL), exactly
as the torchrun launcher runs a job, minus the reporting API (rank 0's events are collected in-process).

  goal:  images/s on N GPUs >= 0.9 x N x images/s on 1 GPU      (ratio = N-GPU / (N x 1-GPU))

images/s: steps x global batch / epoch time (training + its sharded validation), the median over the
epochs after the first (warm-up: cuDNN autotuning, NCCL buckets). On the CPU dry run the "GPUs" are
gloo processes: the path is exercised, the figure means nothing. One GPU: skipped, with a note.

  python -m bench.ddp_scaling --rank-job FOLDER --world W ...   (what torchrun runs in each process)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GOAL = 0.9  # of perfect scaling
CHECK = "ddp_scaling"


@dataclass(frozen=True)
class Size:
    model: str
    image_size: int
    jpeg_size: int
    per_gpu_batch: int
    steps_per_epoch: int  # at the largest world size; the 1-GPU run takes N times as many
    epochs: int
    timeout_s: float  # one torchrun run, start-up included


GPU_SIZE = Size("resnet50", 224, 256, 64, 12, 3, 100)
CPU_SIZE = Size("timm/convnext_atto", 32, 40, 4, 3, 2, 240)


def row_name(gpus: int) -> str:
    return f"ddp_{gpus}gpu_vs_1gpu"


def plan(cuda: bool, gpu_count: int) -> tuple[int, dict[str, Any] | None]:
    """The world size to compare with 1, or a skip entry saying why there is nothing to compare."""
    if not cuda:
        return 2, None  # two gloo processes: the dry run of the same path
    if gpu_count < 2:
        return 0, {
            "check": row_name(2),
            "kind": "speed",
            "status": f"skipped: {gpu_count} GPU on this machine; DDP scaling needs 2 or more",
            "note": "N GPUs images/s >= 0.9 x N x 1 GPU is measured on a machine with several GPUs",
            "goal": GOAL,
        }
    return gpu_count, None


def compare(size: Size, workdir: Path, world: int, cuda: bool) -> dict[str, Any]:
    """Run the job on 1 and on `world` processes; the entry for the results file."""
    data = workdir / "data"
    images = size.steps_per_epoch * world * size.per_gpu_batch
    _write_images(data / "ddp", images, size.jpeg_size)
    speed = {
        n: images_per_s(run_torchrun(size, workdir, n, cuda), size.per_gpu_batch * n) for n in (1, world)
    }
    ratio = speed[world] / (world * speed[1]) if speed[1] > 0 else 0.0
    status = (
        ("pass" if ratio >= GOAL else "fail") if cuda else "measured (dry run: gloo processes on the CPU)"
    )
    return {
        "check": row_name(world),
        "kind": "speed",
        "status": status,
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "values": {
            "images_per_s_1": round(speed[1], 1),
            f"images_per_s_{world}": round(speed[world], 1),
            "train_images": images,
            **asdict(size),
        },
        "backend": "nccl" if cuda else "gloo",
        "compared_with": "the same job through torchrun on 1 GPU, same per-GPU batch (weak scaling)",
    }


def images_per_s(epochs: list[dict[str, Any]], global_batch: int) -> float:
    timed = epochs[1:] or epochs
    return statistics.median(e["steps"] * global_batch / e["epoch_time_s"] for e in timed)


def run_torchrun(size: Size, workdir: Path, world: int, cuda: bool) -> list[dict[str, Any]]:
    """`world` processes under torchrun; rank 0's EPOCH events."""
    out = workdir / f"ddp-{world}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
        "--max-restarts", "0", "-m", "bench.ddp_scaling", "--rank-job", str(workdir), "--world", str(world),
        "--size", json.dumps(asdict(size)), "--out", str(out),
    ] + (["--cuda"] if cuda else [])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=size.timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun on {world} process(es) exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _write_images(folder: Path, count: int, size: int) -> None:
    from bench.gpu_data import write_jpeg_folder

    if not folder.exists():
        partial = folder.with_name(folder.name + "-partial")
        write_jpeg_folder(partial, count + count // 4, size)  # + the validation fifth
        partial.rename(folder)


def rank_job(workdir: Path, world: int, size: Size, cuda: bool, out: Path) -> None:
    """One rank's training (torchrun set RANK, LOCAL_RANK, WORLD_SIZE); rank 0 writes its EPOCH events."""
    from bench.gpu_data import job_spec, settings_for
    from service.records import EventKind
    from service.training.distributed import Ranks
    from service.training.reporting import CollectingReporter
    from service.training.runner import train

    ranks = Ranks.from_env()
    spec = job_spec(
        f"ddp-{world}", size.model, data="ddp", epochs=size.epochs, batch_size=size.per_gpu_batch * world,
        image_size=size.image_size, device="cuda" if cuda else "cpu", feature_cache=False,
    )  # fmt: skip
    resources = {"gpus": world} if cuda else {"gpus": 0, "processes_per_node": world}
    spec = spec.model_validate({**spec.model_dump(), "resources": resources})
    reporter = CollectingReporter()
    train(spec, workdir / "jobs" / f"ddp-{world}", settings_for(workdir), reporter, ranks)
    if ranks.is_main:
        out.write_text(json.dumps([d for k, _, d in reporter.events if k == EventKind.EPOCH]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-job", type=Path, required=True, help="the work folder (data/ddp in it)")
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--size", required=True, help="a Size as JSON")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args(argv)
    rank_job(args.rank_job, args.world, Size(**json.loads(args.size)), args.cuda, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
