"""The warm-worker zygote as a child of the service, beside TorchServe (service.packaging.ts_zygote).

TorchServeProcess starts it just before TorchServe and stops it after; the supervisor's watchdog
starts it again when it died. Its files live in TorchServe's folder:
  worker-python        the launcher script TorchServe runs as its workers' Python (ts_launcher)
  tmp/zygote.sock      where launchers reach it (tmp/ is emptied at every TorchServe start)
  logs/zygote.log      its output
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from service.packaging.ts_launcher import script

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
SHEBANG_LIMIT = 250  # Linux reads at most 256 bytes of a script's "#!" line (BINPRM_BUF_SIZE)


def possible() -> bool:
    """Whether a launcher script can name this interpreter (a very long venv path cannot)."""
    return len(f"#!{sys.executable} -IS") < SHEBANG_LIMIT


class WarmWorkers:
    """One zygote process: start (it becomes warm seconds later, on its own), stop, keep alive."""

    def __init__(self, root: Path, tmp: Path, logs: Path) -> None:
        self.launcher = root / "worker-python"
        self.socket = tmp / "zygote.sock"
        self.log_file = logs / "zygote.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def write_launcher(self) -> Path:
        """The launcher script, for this interpreter and this socket; returns its path."""
        temporary = self.launcher.with_suffix(".tmp")
        temporary.write_text(script(str(self.socket), sys.executable))
        temporary.chmod(0o755)
        os.replace(temporary, self.launcher)
        return self.launcher

    def start(self, env: dict[str, str]) -> None:
        """Start the zygote with TorchServe's environment (what its workers would inherit)."""
        with self._lock:
            if self.is_running():
                return
            with open(self.log_file, "ab") as out:
                self._popen = subprocess.Popen(
                    [sys.executable, "-m", "service.packaging.ts_zygote", "--socket", str(self.socket)],
                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            self._env = env
            log.info("warm TorchServe worker zygote starting (pid %d)", self._popen.pid)

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def is_warm(self) -> bool:
        """Running and listening: a worker started now is forked warm."""
        return self.is_running() and self.socket.exists()

    def keep_alive(self) -> None:
        """Start it again if it died (workers start cold meanwhile)."""
        if self._popen is not None and not self.is_running():
            log.warning("the warm-worker zygote exited (%s); starting it again", self._popen.returncode)
            self._popen = None
            self.start(self._env)

    def stop(self) -> None:
        """SIGTERM (it ends its children), then SIGKILL its group; its socket is gone after."""
        with self._lock:
            popen, self._popen = self._popen, None
            if popen is None:
                return
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("the warm-worker zygote did not stop within %.0f s; killing it", STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            self.socket.unlink(missing_ok=True)  # a killed zygote left it: launchers would try it in vain
