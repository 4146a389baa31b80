"""TorchServe as a child process of the service: its folders, start, stop and death (its keys: ts_keys).

Everything TorchServe writes lives under `settings.torchserve_dir`, so two services on one machine
never share a file:
  config.properties   generated at every start from Settings (service.packaging.ts_config)
  key_file.json       written by TorchServe into its working directory (this folder), mode 0600
  tmp/                TEMP/TMPDIR: TorchServe's pid file `.model_server.pid`, unpacked archives
                      (`models/<uuid>`), worker sockets `.ts.sock.<port>`
  logs/               LOG_LOCATION/METRICS_LOCATION: ts_log.log, model_log.log, metrics; stdout.log;
                      zygote.log
  worker-python       the warm-worker launcher TorchServe runs as its workers' Python, with
                      tmp/zygote.sock (service.packaging.ts_warm; TUNESERVE_TORCHSERVE_WARM_WORKERS)

TorchServe runs in the foreground in its own process group (`torchserve --foreground` waits on the
JVM), so the launcher's exit is the JVM's death, and stopping the group ends the Python workers too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from service.devices import VISIBLE_DEVICES, visible_devices
from service.errors import FailedPrecondition, Unavailable
from service.packaging.ts_config import inference_url, render_config
from service.packaging.ts_keys import KeyRing, TorchServeKeys
from service.packaging.ts_warm import WarmWorkers
from service.packaging.ts_warm import possible as warm_possible
from service.settings import Settings

log = logging.getLogger(__name__)

JAVA_MAIN = "org.pytorch.serve.ModelServer"
STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class TorchServePaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.root / "key_file.json"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def pid_file(self) -> Path:
        return self.tmp / ".model_server.pid"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stdout_log(self) -> Path:
        return self.logs / "stdout.log"


class TorchServeProcess:
    """Start, watch and stop one TorchServe whose files all live under settings.torchserve_dir."""

    def __init__(self, settings: Settings, *, worker_threads: int | None = None) -> None:
        self.settings = settings
        # torch threads per Python worker; None keeps torch's default (all cores, per worker!)
        self.worker_threads = worker_threads
        self.paths = TorchServePaths(settings.torchserve_dir.resolve())
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()  # start / stop / restart
        self.keyring = KeyRing(settings, self.paths.key_file)
        self.warm = WarmWorkers(self.paths.root, self.paths.tmp, self.paths.logs)

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start TorchServe and wait until /ping says Healthy (settings.torchserve_start_timeout_s)."""
        with self._lock:
            if self.is_running():
                return
            self._prepare_folders()
            self.paths.config.write_text(render_config(self.settings))
            env = self.environment()
            launch = [sys.executable, "-m", "ts.model_server"]
            if self.settings.torchserve_warm_workers and warm_possible():
                # the zygote imports while the JVM starts; workers started before it is ready go cold
                self.warm.start(env)
                launch = [sys.executable, "-m", "service.packaging.ts_start", str(self.warm.write_launcher())]
            command = [
                *launch, "--start", "--foreground", "--ncs",
                "--ts-config", str(self.paths.config),
                "--model-store", str(self.settings.model_store.resolve()),
                "--enable-model-api",
            ]  # fmt: skip
            if not self.settings.torchserve_token_auth:
                command.append("--disable-token-auth")
            with open(self.paths.stdout_log, "ab") as out:
                self._popen = subprocess.Popen(
                    command, cwd=self.paths.root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            log.info("TorchServe starting (pid %d) in %s", self._popen.pid, self.paths.root)
            try:
                self._wait_healthy(self.settings.torchserve_start_timeout_s)
            except BaseException:
                self.stop()
                raise

    def environment(self) -> dict[str, str]:
        """TorchServe's environment, which it passes on to its Python workers: ours without TS_* overrides,
        its folders, and only the serving GPUs visible (number_of_gpu in its config says how many)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
        tmp, logs = str(self.paths.tmp), str(self.paths.logs)
        env.update(TEMP=tmp, TMPDIR=tmp, LOG_LOCATION=logs, METRICS_LOCATION=logs)
        parent = os.environ.get(VISIBLE_DEVICES)
        env[VISIBLE_DEVICES] = visible_devices(self.settings.serving_gpu_indices, parent)
        if self.worker_threads:
            env["OMP_NUM_THREADS"] = str(self.worker_threads)
        return env

    def stop(self) -> None:
        """SIGTERM the JVM (it stops its workers), wait, then SIGKILL whatever is left of the group."""
        with self._lock:
            popen, self._popen = self._popen, None
            if popen is None:
                return
            java = self.java_pid(popen)
            with contextlib.suppress(ProcessLookupError):
                os.kill(java or popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("TorchServe did not stop within %.0f s; killing it", STOP_GRACE_S)
            _kill_group(popen.pid)
            popen.wait()
            self.warm.stop()
            self.keyring.forget()
            log.info("TorchServe stopped")

    def restart(self) -> None:
        with self._lock:
            self.stop()
            self.start()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def keep_warm(self) -> None:
        """Start the warm-worker zygote again if it died (the watchdog calls this while TorchServe runs)."""
        with self._lock:
            if self.settings.torchserve_warm_workers and warm_possible() and self.is_running():
                self.warm.keep_alive()

    def java_pid(self, popen: subprocess.Popen[bytes] | None = None) -> int | None:
        """The JVM's pid from TorchServe's pid file, if it belongs to our process group."""
        popen = popen or self._popen
        try:
            pid = int(self.paths.pid_file.read_text().split()[0])
            if popen is not None and os.getpgid(pid) == popen.pid:
                return pid
        except (OSError, ValueError, IndexError):
            pass
        return None

    # ------------------------------------------------------------------------------------------ keys

    def keys(self) -> TorchServeKeys:
        """The current keys, renewed shortly before TorchServe expires them (service.packaging.ts_keys)."""
        return self.keyring.current()

    def renew_keys(self) -> TorchServeKeys:
        """Fresh management and inference keys (after TorchServe refused the current ones)."""
        return self.keyring.renew()

    # ------------------------------------------------------------------------------------- internals

    def _prepare_folders(self) -> None:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.settings.model_store.mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        # The folder is ours alone: a stale pid file, unpacked archives and sockets can all go.
        shutil.rmtree(self.paths.tmp, ignore_errors=True)
        self.paths.tmp.mkdir()
        self.paths.key_file.unlink(missing_ok=True)

    def _stop_orphan(self) -> None:
        """A TorchServe left running by a service that died holds our ports and folder: end it."""
        import psutil  # a TorchServe dependency

        try:
            pid = int(self.paths.pid_file.read_text().split()[0])
            process = psutil.Process(pid)
            if JAVA_MAIN not in process.cmdline():
                return
        except (OSError, ValueError, IndexError, psutil.Error):
            return
        log.warning("stopping an orphaned TorchServe (pid %d) that uses %s", pid, self.paths.root)
        try:
            group = os.getpgid(pid)
            process.terminate()
            process.wait(STOP_GRACE_S)
        except psutil.TimeoutExpired:
            pass
        except (psutil.Error, OSError):
            return
        _kill_group(group)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                raise Unavailable(f"TorchServe exited while starting: {self.log_tail()}")
            if self.settings.torchserve_token_auth and not self.keyring.loaded.inference:
                try:
                    self.keyring.load()
                except FailedPrecondition:  # not written yet (or half written)
                    time.sleep(0.2)
                    continue
            if self.ping():
                log.info("TorchServe is healthy at %s", inference_url(self.settings))
                return
            time.sleep(0.3)
        raise Unavailable(
            f"TorchServe was not healthy within {timeout_s:.0f} s (TUNESERVE_TORCHSERVE_START_TIMEOUT_S): "
            f"{self.log_tail()}"
        )

    def ping(self) -> bool:
        """True when TorchServe's /ping answers Healthy."""
        request = urllib.request.Request(
            f"{inference_url(self.settings)}/ping", headers=self.keyring.loaded.header("inference")
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read()).get("status") == "Healthy"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.paths.stdout_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no TorchServe output)"
        return " | ".join(text[-lines:]) or "(no TorchServe output)"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
