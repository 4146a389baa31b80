"""A worker's exit (service.worker_app.exit_now): its exit code and atexit handlers, without Python's
module teardown (seconds with torch loaded, between a job's PACKAGED event and its deploy)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import atexit, logging, sys
from service.worker_app import exit_now
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
atexit.register(lambda: print("atexit ran", flush=True))
logging.info("logged before the exit")
sys.stdout.write("buffered, not flushed")
exit_now(3)
"""


def test_exit_now_keeps_the_code_runs_atexit_and_flushes_stdio() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "buffered, not flushed" in done.stdout
    assert "atexit ran" in done.stdout
    assert "logged before the exit" in done.stderr
