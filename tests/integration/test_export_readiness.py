"""The KServe runtime's readiness probe (service.packaging.ts_ready) against a real TorchServe serving an
exported folder, started exactly as tests/integration/test_export_serving.py starts it (KServe's
command, in a virtualenv without tuneserve, ports moved by TS_* variables as the exported config allows).

The probe runs as a plain file with that virtualenv's Python, the way the kubelet's exec would run it
in the container (same environment): so it needs neither tuneserve's imports nor torch. It must say
"not ready" while the snapshot's model loads, even once the inference port accepts connections (what
the tcpSocket probe it replaces waited for), and "ready" once the model answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_export_serving import _kill_leftover, clean_env, exported, free_port, plain_env

import service.packaging.ts_ready as ts_ready

__all__ = ["exported", "plain_env"]  # module-scoped fixtures, shared with test_export_serving

pytestmark = [pytest.mark.torchserve, pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class Sample:
    at_s: float
    port_open: bool
    probe_rc: int
    probe_says: str


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_not_ready_while_the_model_loads_ready_once_it_answers(
    plain_env: Path, exported: Path, tmp_path: Path, serving_images: list[bytes]
):
    run = tmp_path / "run"
    (run / "tmp").mkdir(parents=True)
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpc_management")}
    env = clean_env(
        plain_env,
        TEMP=str(run / "tmp"), TMPDIR=str(run / "tmp"),
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{ports['inference']}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports['management']}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports['metrics']}",
        TS_GRPC_INFERENCE_PORT=str(ports["grpc"]),
        TS_GRPC_MANAGEMENT_PORT=str(ports["grpc_management"]),
        TS_VMARGS="-Xmx512m -XX:+UseSerialGC",
    )  # fmt: skip
    config = exported / "config" / "config.properties"
    probe = [
        str(plain_env / "bin" / "python"), ts_ready.__file__,
        f"--ts-config={config}", f"--key-file={run / 'key_file.json'}",
    ]  # fmt: skip

    def ask() -> subprocess.CompletedProcess[str]:
        return subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    before = ask()
    assert before.returncode == 1 and "no key file" in before.stderr  # nothing started yet

    command = [
        "torchserve", "--start", "--model-store", str(exported / "model-store"), "--ts-config", str(config),
    ]  # fmt: skip
    started = time.monotonic()
    with open(run / "start.log", "wb") as log:
        subprocess.run(
            command, cwd=run, env=env, check=True, timeout=120, stdout=log, stderr=subprocess.STDOUT
        )
    samples: list[Sample] = []
    try:
        while True:
            opened = port_open(ports["inference"])
            done = ask()
            samples.append(
                Sample(
                    time.monotonic() - started, opened, done.returncode, (done.stdout + done.stderr).strip()
                )
            )
            if done.returncode == 0 or time.monotonic() - started > 300:
                break
            time.sleep(0.2)
        assert samples[-1].probe_rc == 0, f"never ready: {samples[-3:]}"
        assert "pets version 3: READY" in samples[-1].probe_says
        # the window a tcpSocket probe would have let traffic in: port open, model not loaded yet
        loading = [s for s in samples if s.port_open and s.probe_rc == 1]
        assert loading, f"the port never opened before the model was ready: {samples}"
        assert all("not ready" in s.probe_says for s in samples[:-1])

        # ready means it answers: a prediction now, without waiting in TorchServe's queue for a worker
        key = json.loads((run / "key_file.json").read_text())["inference"]["key"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['inference']}/predictions/pets", data=serving_images[0],
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200 and answer.read()
        print(  # the measurement for the notes: how long a tcpSocket probe would have been wrong
            f"port open while not ready: {loading[0].at_s:.1f} s to {samples[-1].at_s:.1f} s after start "
            f"({len(loading)} probes said not ready meanwhile)"
        )
    finally:
        subprocess.run(
            ["torchserve", "--stop"], cwd=run, env=env, timeout=120, check=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _kill_leftover(run / "tmp" / ".model_server.pid")
    after = ask()
    # stopped: not ready again (--stop removes the key file, or the port no longer answers)
    assert after.returncode == 1 and "not ready" in after.stderr
