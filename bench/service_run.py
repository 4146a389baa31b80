"""One job through a real service process: the run that benchmarks 3 (latency) and 6 (memory) read.

`tuneserve serve` runs as a child process (its own memory, like production) with TorchServe on (or
off) and every port free on loopback. One small job is submitted over gRPC and watched: its first
PROGRESS event is its first training step (the loop reports step 1 at once), and once its SERVED
event arrives the served model is asked for a prediction through the service's Inference API.
The parts of both halves come from the same events and from the worker's own `worker timings` line in
its worker.log (when its process started, when its imports were done, when it got its job): see
`parts`. Meanwhile a sampler reads the peak RSS (VmHWM) of the service, its worker and TorchServe's processes
from /proc every 50 ms (a worker's peak is read just before it exits).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import free_ports, make_image_folder, png_bytes
from service.jobs.local_launcher import SPARE_LOG

ROLES = (
    "service",
    "worker",
    "torchserve_frontend",
    "torchserve_worker",
    "torchserve_zygote",
    "torchserve_launcher",
)
ZYGOTE = "service.packaging.ts_zygote"  # warm TorchServe workers are forked from it (its command line)
WORKER_TIMINGS = re.compile(r"worker timings (\{.*\})")


@dataclass
class ServiceRun:
    latency: dict[str, Any]
    peak_rss_mib: dict[str, float]  # by role: the largest process of that role
    processes: dict[str, int] = field(default_factory=dict)  # by role: how many were seen


def run_job(
    *,
    torchserve: bool,
    epochs: int = 1,
    per_class: int = 8,
    timeout_s: float = 300.0,
    extra_env: dict[str, str] | None = None,
) -> ServiceRun:
    """Start the service, run one job to served (or to done without TorchServe), stop the service.
    `extra_env`: more TUNESERVE_* settings for the service (e.g. TUNESERVE_WARM_WORKERS=0)."""
    import grpc

    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        root = Path(tmp)
        make_image_folder(root / "data" / "ds", classes=2, per_class=per_class, size=40)
        port, *ts_ports = free_ports(6)
        env = {
            **os.environ,
            "TUNESERVE_STATE_DIR": str(root / "state"),
            "TUNESERVE_DATA_ROOT": str(root / "data"),
            "TUNESERVE_TORCH_HOME": str(root / "torch"),
            "TUNESERVE_PORT": str(port),
            "TUNESERVE_MAX_CONCURRENT_JOBS": "1",
            "TUNESERVE_TORCHSERVE_ENABLED": "true" if torchserve else "false",
            "TUNESERVE_TORCHSERVE_JAVA_HEAP": "256m",
            "TUNESERVE_TORCHSERVE_START_TIMEOUT_S": "180",
            "OMP_NUM_THREADS": "1",  # the shared CPUs here: one thread per process runs far faster
            **(extra_env or {}),
        }
        names = ("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_INFERENCE", "GRPC_MANAGEMENT")
        env |= {f"TUNESERVE_TORCHSERVE_{n}_PORT": str(p) for n, p in zip(names, ts_ports, strict=True)}
        log = open(root / "service.log", "wb")  # noqa: SIM115  # closed below, after the process
        started = time.time()
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--log-level", "WARNING"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        sampler = MemorySampler(process.pid, str(root))
        sampler.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=timeout_s)
                wait_healthy(channel, timeout_s)
                ready = time.time()
                if env.get("TUNESERVE_WARM_WORKERS", "1") != "0":
                    # steady state: a service up for a while has its spare ready before a job comes
                    wait_spares(root / "state" / SPARE_LOG, wanted=1, timeout_s=timeout_s)
                if torchserve and env.get("TUNESERVE_TORCHSERVE_WARM_WORKERS", "true") != "false":
                    # likewise its TorchServe's warm-worker zygote (still importing, it would compete
                    # for the CPU with the job, and the job's version would start cold)
                    zygote_log = root / "state" / "torchserve" / "logs" / "zygote.log"
                    wait_line(zygote_log, "zygote ready", timeout_s)
                spare_ready = time.time()
                latency = _one_job(pb, pb_grpc.FineTuningStub(channel), pb_grpc.InferenceStub(channel),
                                   torchserve, epochs, timeout_s)  # fmt: skip
                latency["service_start_to_ready_s"] = round(ready - started, 3)
                latency["ready_to_spare_ready_s"] = round(spare_ready - ready, 3)
                marks = latency.pop("_marks")
                latency |= parts(marks, worker_timings(root / "state" / "jobs"))
                if "packaged" in marks and "gated" in marks:
                    logs = root / "state" / "torchserve" / "logs"
                    registered = marks["gated"] - marks["gate_s"]  # the gate starts once it is ready
                    latency["register_parts_s"] = register_parts(logs, marks["packaged"], registered, "bench")
        except BaseException:
            log.flush()
            sys.stderr.write((root / "service.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            sampler.stop_sampling()
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        return ServiceRun(latency, sampler.peaks_mib(), sampler.counts())


def wait_spares(spare_log: Path, wanted: int, timeout_s: float) -> None:
    """Until `wanted` spare workers in all have said they are ready (the log keeps every spare's line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = spare_log.read_text(errors="replace") if spare_log.is_file() else ""
        if text.count("spare worker ready") >= wanted:
            return
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {wanted} spare workers were ready after {timeout_s} s (see {spare_log})")


def wait_line(log: Path, text: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until `log` holds `text`; at once when `process` (the one writing the log) has exited instead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited ({process.returncode}) before saying {text!r}: {_tail(log)}")
        time.sleep(0.1)
    raise TimeoutError(f"{log} did not say {text!r} within {timeout_s} s: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.is_file() else "(no log)"


def wait_healthy(channel: Any, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the service was not SERVING after {timeout_s} s")


def _one_job(
    pb: Any, jobs: Any, inference: Any, torchserve: bool, epochs: int, timeout_s: float
) -> dict[str, Any]:
    spec = pb.JobSpec(name="bench-latency")
    spec.model.architecture, spec.model.weights = "mobilenet_v3_small", "none"
    spec.data.path, spec.data.val_fraction = "ds", 0.25
    spec.training.epochs, spec.training.batch_size, spec.training.image_size = epochs, 4, 32
    spec.training.augmentation, spec.training.device = "none", "cpu"
    spec.early_stopping.enabled = False
    spec.logging.tensorboard = False
    spec.logging.wandb.mode = "disabled"
    spec.serving.enabled = torchserve
    if torchserve:
        spec.serving.model_name, spec.serving.batch_size, spec.serving.max_batch_delay_ms = "bench", 1, 0
    submitted = time.time()
    job_id = jobs.CreateJob(pb.CreateJobRequest(spec=spec)).id
    marks: dict[str, float] = {}
    answer_at = None
    for event in jobs.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout_s):
        at = event.time.seconds + event.time.nanos / 1e9
        if event.kind == "STATE" and event.state == pb.RUNNING:
            marks.setdefault("running", at)
        if event.kind == "INFO" and event.message.startswith("training on "):  # the end of prepare()
            marks.setdefault("prepared", at)
        if event.kind == "PROGRESS":
            marks.setdefault("first_step", at)
        if event.kind in ("EPOCH", "CHECKPOINT"):
            marks["training_end"] = at
        if event.kind == "PACKAGED":
            marks["packaged"] = at
        if event.kind == "INFO" and event.message.startswith("promotion gate:"):
            marks["gated"] = at
            marks["gate_s"] = float(event.data["seconds"])
        if event.kind == "SERVED":
            marks["served"] = at
            image = png_bytes(0)
            while answer_at is None:  # the model is the default now: its first answer
                answer = inference.Predict(pb.PredictRequest(model="bench", images=[image]), timeout=60)
                if answer.predictions and answer.predictions[0].scores:
                    answer_at = time.time()
    job = jobs.GetJob(pb.GetJobRequest(job_id=job_id))
    if job.state != pb.SUCCEEDED:
        raise RuntimeError(f"the benchmark job ended {pb.JobState.Name(job.state)}: {job.error}")
    result: dict[str, Any] = {
        "submit_to_running_s": round(marks["running"] - submitted, 3),
        "submit_to_first_step_s": round(marks["first_step"] - submitted, 3),
        "training_s": round(marks["training_end"] - marks["first_step"], 3),
    }
    if answer_at is not None:
        result["training_end_to_served_s"] = round(marks["served"] - marks["training_end"], 3)
        result["training_end_to_first_answer_s"] = round(answer_at - marks["training_end"], 3)
        marks["answer"] = answer_at
    result["_marks"] = {**marks, "submitted": submitted}
    return result


def worker_timings(jobs_dir: Path) -> dict[str, Any]:
    """The `worker timings` line of the (one) job's last worker (service.worker_app writes it)."""
    found: dict[str, Any] = {}
    for log in jobs_dir.glob("*/worker.log"):
        for match in WORKER_TIMINGS.finditer(log.read_text(errors="replace")):
            found = json.loads(match.group(1))
    return found


def parts(marks: dict[str, float], worker: dict[str, Any]) -> dict[str, Any]:
    """Where the time went, in seconds. Before the first step: queue (submission -> RUNNING), spawn
    (RUNNING -> the worker process exists, or a spare is handed the job), imports (-> the worker has
    imported what a job needs and holds its job: a spare's rest of its imports, if any, and the hand-over
    on its stdin), build (-> the end of prepare: data scan, model, loaders) and first batch
    (-> the first step's report). After training: package (-> PACKAGED: final evaluation and archive),
    register (-> the version is loaded in TorchServe), gate, promote (-> SERVED), first answer."""
    out: dict[str, Any] = {}
    if worker:
        running = marks["running"]
        # a cold worker has its job when its process starts, a spare when the launcher hands it over
        has_job = worker["sent_at"] if worker["warm"] else worker["assigned_at"]
        ready = max(worker["imports_done_at"], worker["assigned_at"])
        out["warm_worker"] = bool(worker["warm"])
        out["first_step_parts_s"] = _rounded(
            queue=running - marks["submitted"],
            spawn=has_job - running,
            imports=ready - has_job,
            build=marks["prepared"] - ready,
            first_batch=marks["first_step"] - marks["prepared"],
        )
    if "served" in marks and "gated" in marks:
        gate_started = marks["gated"] - marks["gate_s"]
        out["served_parts_s"] = _rounded(
            package=marks["packaged"] - marks["training_end"],
            register=gate_started - marks["packaged"],
            gate=marks["gate_s"],
            promote=marks["served"] - marks["gated"],
            first_answer=marks["answer"] - marks["served"],
        )
    return out


TS_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d),(\d{3}) ")
# 202: registration answers once the version is added, its worker starting (never synchronous=true)
REGISTER_CALL = re.compile(r'"POST /models\?url=[^"]*model_name=(?P<model>[^&" ]+)[^"]*" 20[02] (?P<ms>\d+)')


def register_parts(logs: Path, packaged: float, registered: float, model: str) -> dict[str, float]:
    """The register part (PACKAGED -> `registered`, when the service saw the version ready), split by
    TorchServe's own logs (ts_log.log, model_log.log, access_log.log): request (-> the register call
    reaches TorchServe: the worker's exit, the gate images), unpack (-> the version is added: the .mar
    unzipped; the call is answered then), worker_process (-> the Python worker says it started:
    interpreter, TorchServe's modules, torch), handler (the LOAD command -> our handler's `loaded`
    line: its imports, the network built, the weights), ready_seen (-> the service's poll saw a READY
    worker). Empty when a log line is missing (a TorchServe that logs otherwise)."""
    try:
        ts_log = (logs / "ts_log.log").read_text(errors="replace").splitlines()
        access = (logs / "access_log.log").read_text(errors="replace").splitlines()
    except OSError:
        return {}
    call = next((m for line in access if (m := REGISTER_CALL.search(line)) and m["model"] == model), None)
    if call is None:
        return {}
    at = {
        "answered": _ts_time(next((line for line in access if call.group(0) in line), "")),
        "added": _first(ts_log, f"updateModel: {model},"),
        "started": _first(ts_log, "Torch worker started."),
        "load": _first(ts_log, "Flushing req.cmd LOAD"),
        "loaded": _first(ts_log, "MODEL_LOG - loaded "),
    }
    known = {name: value for name, value in at.items() if value is not None}
    if len(known) < len(at):
        return {}
    arrived = known["answered"] - int(call["ms"]) / 1000
    return _rounded(
        request=arrived - packaged,
        unpack=known["added"] - arrived,
        worker_process=known["started"] - known["added"],
        connect=known["load"] - known["started"],
        handler=known["loaded"] - known["load"],
        ready_seen=registered - known["loaded"],
    )


def _first(lines: list[str], text: str) -> float | None:
    return next((_ts_time(line) for line in lines if text in line), None)


def _ts_time(line: str) -> float | None:
    """A TorchServe log line's time (log4j's local time, millisecond) as a Unix time."""
    match = TS_TIME.match(line)
    if match is None:
        return None
    return time.mktime(time.strptime(match[1], "%Y-%m-%dT%H:%M:%S")) + int(match[2]) / 1000


def _rounded(**seconds: float) -> dict[str, float]:
    return {name: round(value, 3) for name, value in seconds.items()}


class MemorySampler(threading.Thread):
    """Peak RSS per process of the service's tree and of TorchServe (found by our state folder)."""

    def __init__(self, service_pid: int, marker: str, period_s: float = 0.05) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.service_pid, self.marker, self.period_s = service_pid, marker, period_s
        self.peak_kib: dict[int, tuple[str, int]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            self.sample()

    def stop_sampling(self) -> None:
        self.sample()
        self._stop_event.set()
        self.join(timeout=5)

    def sample(self) -> None:
        for pid, role in self._processes().items():
            peak = _vm_hwm_kib(pid)
            if peak is not None and peak > self.peak_kib.get(pid, ("", 0))[1]:
                self.peak_kib[pid] = (role, peak)

    def peaks_mib(self) -> dict[str, float]:
        peaks: dict[str, float] = {}
        for role, kib in self.peak_kib.values():
            peaks[role] = max(peaks.get(role, 0.0), round(kib / 1024, 1))
        return peaks

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for role, _ in self.peak_kib.values():
            counts[role] = counts.get(role, 0) + 1
        return counts

    def _processes(self) -> dict[int, str]:
        found: dict[int, str] = {}
        parents: dict[int, int] = {}
        commands: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                commands[int(entry)] = (
                    Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        for pid, command in commands.items():
            if pid == self.service_pid:
                found[pid] = "service"
            elif "model_service_worker" in command and self._descends_from_java(pid, parents, commands):
                # a cold worker, or the launcher of a warm one (a few MiB, waiting on the forked worker)
                found[pid] = "torchserve_launcher" if "/worker-python " in command else "torchserve_worker"
            elif ZYGOTE in command and self.marker in command:
                # the zygote's forked children carry its command line: they are TorchServe's workers
                forked = ZYGOTE in commands.get(parents.get(pid, 0), "")
                found[pid] = "torchserve_worker" if forked else "torchserve_zygote"
            elif command.startswith("java") and self.marker in command:
                found[pid] = "torchserve_frontend"
            elif parents.get(pid) == self.service_pid and "python" in command:
                found[pid] = "worker"
        return found

    def _descends_from_java(self, pid: int, parents: dict[int, int], commands: dict[int, str]) -> bool:
        parent = parents.get(pid, 0)
        return commands.get(parent, "").startswith("java") and self.marker in commands.get(parent, "")


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def bare_python_torch_mib() -> float:
    """The baseline: peak RSS of a Python process that only imports torch and torchvision."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child of this (large) process
    # would report the parent's peak. VmHWM belongs to the new address space the exec made.
    code = (
        "import torch, torchvision\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip()) / 1024, 1)  # kB -> MiB
