"""Plain TorchServe on an exported folder, started exactly as KServe's runtime starts it, in a Python
environment where tuneserve does not import.

`torchserve --start --model-store <dir>/model-store --ts-config <dir>/config/config.properties`, run in a
fresh virtualenv that reuses the installed third-party packages (torch, torchvision, timm, TorchServe)
through a .pth line naming this environment's site-packages. A .pth line only adds a path, so the
site-packages' own .pth files, among them tuneserve's editable finder, are not run there, and `import
service` / `import handlers` fail (a full reinstall of torch would cost minutes).

One module, so that tests/integration/test_export_serving.py, test_export_readiness.py and
bench/serving_export.py build and start it the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import free_ports

PORTS = ("inference", "management", "metrics", "grpc", "grpc_management")
START_TIMEOUT_S = 120.0  # `torchserve --start` returns once the JVM is launched, not once models load


def plain_virtualenv(venv: Path) -> Path:
    """A virtualenv that imports torch, timm and TorchServe but not tuneserve, with a `torchserve` command."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # type: ignore[attr-defined]
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([venv / "bin" / "python", "-c", where], text=True).strip())
    # a .pth line only adds the path: the dev venv's own .pth files (tuneserve's editable finder) do not run
    (site / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    torchserve = venv / "bin" / "torchserve"  # what installing TorchServe there would write
    torchserve.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n"
    )
    torchserve.chmod(0o755)
    return venv


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment a container would give: no PYTHONPATH, the plain venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return {**env, **extra}


@dataclass(frozen=True)
class PlainTorchServe:
    """One plain TorchServe: its exported folder, its working directory (logs/, key_file.json, tmp/),
    its ports on loopback and the environment it runs in."""

    exported: Path
    run: Path
    ports: dict[str, int]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def config(self) -> Path:
        return self.exported / "config" / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.run / "key_file.json"

    def key(self, api: str = "inference") -> str:
        """The API's key from key_file.json; "" when there is none (token authorization off)."""
        try:
            return str(json.loads(self.key_file.read_text())[api]["key"])
        except (OSError, ValueError, KeyError):
            return ""

    def start(self) -> None:
        """KServe's command; returns once the JVM is launched (the model loads after)."""
        command = [
            "torchserve", "--start", "--model-store", str(self.exported / "model-store"),
            "--ts-config", str(self.config),
        ]  # fmt: skip
        with open(self.run / "start.log", "wb") as log:  # not a pipe: the JVM it leaves would hold it open
            subprocess.run(
                command, cwd=self.run, env=self.env, check=True, timeout=START_TIMEOUT_S, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def healthy(self) -> bool:
        """/ping says Healthy: the snapshot's models have a ready worker (asked with the key, if any)."""
        key = self.key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            request = urllib.request.Request(f"{self.url}/ping", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as answer:
                return bool(json.loads(answer.read()).get("status") == "Healthy")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-3000:] for p in (self.run / "logs").glob("*.log"))
                raise TimeoutError(f"plain TorchServe did not become healthy in {timeout_s:.0f} s:\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        """`torchserve --stop`; if the JVM outlives it, kill it by the pid it recorded."""
        subprocess.run(
            ["torchserve", "--stop"], cwd=self.run, env=self.env, timeout=120, check=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((self.run / "tmp" / ".model_server.pid").read_text().split()[0]), signal.SIGKILL)


def plain_server(exported: Path, run: Path, venv: Path, *, heap: str = "512m", **env: str) -> PlainTorchServe:
    """A plain TorchServe for `exported` (not started) on free loopback ports, its files under `run`.

    enable_envvars_config=true in the exported config: TS_* move it off KServe's fixed ports, which
    another TorchServe on a shared machine may hold."""
    (run / "tmp").mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    environment = clean_env(
        venv,
        TEMP=str(run / "tmp"), TMPDIR=str(run / "tmp"),
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{ports['inference']}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports['management']}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports['metrics']}",
        TS_GRPC_INFERENCE_PORT=str(ports["grpc"]),
        TS_GRPC_MANAGEMENT_PORT=str(ports["grpc_management"]),
        TS_VMARGS=f"-Xmx{heap} -XX:+UseSerialGC",
        **env,
    )  # fmt: skip
    return PlainTorchServe(exported, run, ports, environment)


@contextmanager
def running(server: PlainTorchServe) -> Iterator[PlainTorchServe]:
    """The server started, stopped on the way out (whatever happened meanwhile)."""
    try:
        server.start()
        yield server
    finally:
        server.stop()
