"""`make demo`: fine-tune ImageNet-pretrained EfficientNet-Lite0 on scikit-learn's digits, serve it, predict.

On a fresh clone, offline: writes the digits as an ImageFolder under .demo/data (a few per class held
out), starts `tuneserve serve` on free ports, submits examples/digits-efficientnet-lite0.yaml, shows the
live progress, predicts the held-out digits through TorchServe (REST, with its inference key) and through
tuneserve's Predict, prints them against the truth, says where the logs, checkpoints and archive are,
and stops the service with SIGTERM. Any failed step exits 1 and prints the end of the service's log.

  python scripts/demo.py [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from PIL import Image
from rich.table import Table
from rich.text import Text

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli import render, specfile
from service.cli.client import Client, ClientConfig, CliError
from service.cli.watch import watch_job

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
SPEC = ROOT / "examples" / "digits-efficientnet-lite0.yaml"
INFERENCE_SERVICE = "tuneserve.v1.Inference"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 40

console = render.make_console()


class DemoError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Mode:
    heldout_per_class: int
    train_per_class: int | None  # None: every remaining digit (about 178 per class)
    epochs: int | None  # None: the example spec's
    image_size: int | None
    timeout_s: float


FULL = Mode(heldout_per_class=2, train_per_class=None, epochs=None, image_size=None, timeout_s=900)
QUICK = Mode(heldout_per_class=1, train_per_class=50, epochs=3, image_size=64, timeout_s=600)


# ------------------------------------------------------------------------------------------ data


def write_digits(data_root: Path, heldout_dir: Path, mode: Mode) -> list[tuple[Path, str]]:
    """scikit-learn's 8x8 digits as RGB PNGs in data_root/digits/<class>/; the held-out (path, truth)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    for folder in (data_root / "digits", heldout_dir):
        shutil.rmtree(folder, ignore_errors=True)
    seen: dict[str, int] = {}
    heldout: list[tuple[Path, str]] = []
    for index in np.random.default_rng(0).permutation(len(digits.target)):
        label = str(digits.target[index])
        count = seen[label] = seen.get(label, 0) + 1
        if count <= mode.heldout_per_class:
            path = heldout_dir / f"{label}_{count}.png"
            heldout.append((path, label))
        elif mode.train_per_class is None or count <= mode.heldout_per_class + mode.train_per_class:
            path = data_root / "digits" / label / f"{index:04d}.png"
        else:
            continue
        save_digit(digits.images[index], path)
    return sorted(heldout)


def save_digit(pixels: np.ndarray, path: Path) -> None:
    # values are 0..16 ink; smooth upscaling makes them look like pen strokes rather than blocks
    gray = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L").resize(
        (32, 32), Image.Resampling.BICUBIC
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    gray.convert("RGB").save(path)


# --------------------------------------------------------------------------------------- service


@dataclass
class RunningService:
    process: subprocess.Popen[bytes]
    address: str
    token: str
    state_dir: Path
    inference_port: int
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no service log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT_NAMES = ("grpc", "inference", "management", "metrics", "ts_grpc", "ts_mgmt")


def start_service(state_dir: Path, data_root: Path, log_path: Path, port_base: int | None) -> RunningService:
    """`tuneserve serve` in its own session, on free ports (or port_base and the five above it), with a
    fresh auth token."""
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    numbers = (
        [free_port() for _ in PORT_NAMES]
        if port_base is None
        else list(range(port_base, port_base + len(PORT_NAMES)))
    )
    ports = dict(zip(PORT_NAMES, numbers, strict=True))
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "TUNESERVE_STATE_DIR": str(state_dir),
        "TUNESERVE_DATA_ROOT": str(data_root),
        "TUNESERVE_HOST": "127.0.0.1",
        "TUNESERVE_PORT": str(ports["grpc"]),
        "TUNESERVE_AUTH_TOKEN": token,
        "TUNESERVE_MAX_CONCURRENT_JOBS": "1",
        "TUNESERVE_TORCHSERVE_INFERENCE_PORT": str(ports["inference"]),
        "TUNESERVE_TORCHSERVE_MANAGEMENT_PORT": str(ports["management"]),
        "TUNESERVE_TORCHSERVE_METRICS_PORT": str(ports["metrics"]),
        "TUNESERVE_TORCHSERVE_GRPC_INFERENCE_PORT": str(ports["ts_grpc"]),
        "TUNESERVE_TORCHSERVE_GRPC_MANAGEMENT_PORT": str(ports["ts_mgmt"]),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--log-level", "INFO"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in this terminal reaches the demo, which stops it in order
        )  # fmt: skip
    address = f"127.0.0.1:{ports['grpc']}"
    return RunningService(process, address, token, state_dir, ports["inference"], log_path)


def wait_until_serving(client: Client, service: RunningService, timeout_s: float) -> None:
    """Until the API and inference (TorchServe) report SERVING; DemoError if the service dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise DemoError(f"the service exited with code {service.process.returncode} while starting")
        try:
            if all(
                client.health_status(name) == health_pb2.HealthCheckResponse.SERVING
                for name in ("", INFERENCE_SERVICE)
            ):
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.5)
    raise DemoError(f"the service was not SERVING within {timeout_s:.0f} s")


def stop_service(service: RunningService) -> None:
    """SIGTERM (the service drains and stops TorchServe), then wait; SIGKILL the group if it hangs."""
    if service.process.poll() is not None:
        return
    service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()
        raise DemoError(
            f"the service did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed it"
        ) from None
    if service.process.returncode != 0:
        raise DemoError(f"the service exited with code {service.process.returncode} on SIGTERM")


# ------------------------------------------------------------------------------------ job + predict


def submit_demo_job(client: Client, mode: Mode) -> str:
    spec = specfile.load_spec_file(SPEC)
    overrides = {"training.epochs": mode.epochs, "training.image_size": mode.image_size}
    request = pb.CreateJobRequest(spec=specfile.spec_to_proto(specfile.apply_overrides(spec, overrides)))
    job = client.call(client.jobs.CreateJob, request)
    console.print(Text(f"submitted job {job.id} from {SPEC.relative_to(ROOT)}", style="bold"))
    return job.id


def predict_rest(service: RunningService, model: str, version: str, image: Path) -> tuple[str, float]:
    """TorchServe's REST API directly, with the inference key TorchServe wrote for this service."""
    keys = json.loads((service.state_dir / "torchserve" / "key_file.json").read_text())
    url = f"http://127.0.0.1:{service.inference_port}/predictions/{model}/{version}"
    headers = {"Authorization": f"Bearer {keys['inference']['key']}", "Content-Type": "image/png"}
    request = urllib.request.Request(url, data=image.read_bytes(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            scores: list[dict[str, Any]] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise DemoError(f"TorchServe REST {url} answered {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DemoError(f"TorchServe REST {url}: {exc}") from None
    return str(scores[0]["label"]), float(scores[0]["probability"])


def predict_heldout(
    client: Client, service: RunningService, job: pb.Job, heldout: list[tuple[Path, str]]
) -> float:
    """Predict each held-out digit both ways, print them against the truth; the REST accuracy."""
    model, version = job.result.served_model, job.result.served_version
    request = pb.PredictRequest(
        model=model, version=version, top_k=1, images=[p.read_bytes() for p, _ in heldout]
    )
    answer = client.call(client.inference.Predict, request)
    table = Table(title=f"held-out digits: {model} version {version}", title_justify="left")
    for column in ("image", "truth", "TorchServe REST", "tuneserve Predict", ""):
        table.add_column(column)
    correct = 0
    for (path, truth), prediction in zip(heldout, answer.predictions, strict=True):
        label, probability = predict_rest(service, model, version, path)
        via_grpc = prediction.scores[0].label if prediction.scores else f"error: {prediction.error}"
        correct += label == truth
        mark = Text("ok", style="green") if label == truth else Text("wrong", style="red")
        table.add_row(path.name, truth, f"{label} ({probability:.2f})", via_grpc, mark)
        if via_grpc != label:
            raise DemoError(f"{path.name}: TorchServe REST says {label} but Predict says {via_grpc}")
    console.print(table)
    accuracy = correct / len(heldout)
    console.print(Text(f"accuracy on {len(heldout)} held-out digits: {accuracy:.1%}", style="bold"))
    return accuracy


def print_locations(job: pb.Job, service: RunningService) -> None:
    result = job.result
    table = Table(show_header=False, title="where everything is", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in (
        ("TensorBoard logs", f"{result.tensorboard_dir}  (tensorboard --logdir {result.tensorboard_dir})"),
        ("W&B offline run", f"{result.wandb_dir}  (wandb sync {result.wandb_dir})"),
        ("checkpoints", f"{result.checkpoint_dir}  (best: {result.best_checkpoint})"),
        ("TorchServe archive", result.archive_path),
        ("service log", str(service.log_path)),
    ):
        table.add_row(name, value)
    console.print(table)


# ------------------------------------------------------------------------------------------ main


def run(mode: Mode, keep: bool, demo_dir: Path, port_base: int | None) -> None:
    started = time.monotonic()
    heldout = write_digits(demo_dir / "data", demo_dir / "heldout", mode)
    console.print(f"wrote scikit-learn's digits to {demo_dir / 'data' / 'digits'} ({len(heldout)} held out)")
    service = start_service(demo_dir / "state", demo_dir / "data", demo_dir / "service.log", port_base)
    console.print(f"starting the service on {service.address} (log: {service.log_path}) ...")
    client = Client(ClientConfig(address=service.address, token=service.token))
    try:
        wait_until_serving(client, service, START_TIMEOUT_S)
        console.print(f"service and TorchServe are SERVING after {time.monotonic() - started:.0f} s")
        job = watch_job(client, submit_demo_job(client, mode), console)
        if job.state != pb.SUCCEEDED:
            raise DemoError(
                f"the job ended {render.state_name(job.state)}: {job.error or 'no error recorded'}"
            )
        if not job.result.served_model:
            raise DemoError("the job succeeded but its model was not served (see the job's events)")
        predict_heldout(client, service, job, heldout)
        print_locations(job, service)
    except BaseException:
        client.close()
        console.print(Text("service log (last lines):", style="bold red"))
        console.print(service.log_tail())
        try:
            stop_service(service)
        except DemoError as exc:
            console.print(Text(str(exc), style="red"))
        raise
    client.close()
    if keep:
        console.print(
            f"the service keeps running (pid {service.process.pid}); use it with\n"
            f"  export TUNESERVE_ADDRESS={service.address} TUNESERVE_AUTH_TOKEN={service.token}\n"
            f"  tuneserve jobs\nstop it with: kill {service.process.pid}"
        )
        return
    stop_service(service)
    console.print(
        Text(f"demo finished in {time.monotonic() - started:.0f} s; the service stopped cleanly", "green")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (the e2e test's mode)")
    parser.add_argument("--keep", action="store_true", help="leave the service running at the end")
    parser.add_argument("--dir", type=Path, default=DEMO, help="where data, state and log go (.demo)")
    parser.add_argument(
        "--port-base",
        type=int,
        metavar="PORT",
        help=f"listen on PORT and the {len(PORT_NAMES) - 1} ports above it (default: any free ports)",
    )
    args = parser.parse_args(argv)
    if args.port_base is not None and not 1024 <= args.port_base <= 65535 - len(PORT_NAMES) + 1:
        parser.error(f"--port-base {args.port_base}: allowed 1024..{65535 - len(PORT_NAMES) + 1}")
    mode = QUICK if args.quick else FULL

    def timed_out(_signum: int, _frame: Any) -> None:
        raise DemoError(f"the demo did not finish within {mode.timeout_s:.0f} s")

    signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(int(mode.timeout_s))
    try:
        run(mode, args.keep, args.dir.resolve(), args.port_base)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"demo failed: {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        call: Any = exc
        print(f"demo failed: {call.code().name}: {call.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
