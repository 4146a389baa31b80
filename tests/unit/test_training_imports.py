"""The control plane's lazy training imports go one thread at a time (service.training_imports).

Two threads entering torchvision's import cycle through different modules can be handed a partially
initialised module by Python's import system (a CreateJob racing the start-up import failed so, rarely).
The race itself is too rare to provoke in a test; what is checked is that each path that imports the
training modules in the service waits while another thread holds the import, and imports nothing
meanwhile. Run in a fresh interpreter: this test process has imported torch long ago.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, threading, time
from service import training_imports
from service.app import _preload_admission
from service.jobs.manager import _admit
from service.settings import Settings
from service.spec import JobSpec

assert "torchvision" not in sys.modules, "imported before any admission"
paths = {
    "admission": lambda: _admit(
        JobSpec.model_validate({"name": "x", "model": {"architecture": "resnet18"}, "data": {"path": "ds"}}),
        Settings(state_dir=sys.argv[1], data_root=sys.argv[1]),
    ),
    "preload": _preload_admission,
}
training_imports._lock.acquire()  # as another thread's import would hold it
done = []
def run(name):
    try:
        paths[name]()
    except Exception:
        pass  # admission refuses the spec (no dataset): what matters is what it imported, and when
    done.append(name)
threads = [threading.Thread(target=run, args=(name,)) for name in paths]
for thread in threads:
    thread.start()
time.sleep(1.5)
print("while held:", "torchvision" in sys.modules, sorted(done))
training_imports._lock.release()
for thread in threads:
    thread.join(120)
print("after:", "torchvision" in sys.modules, sorted(done))
"""


@pytest.mark.slow
def test_admission_and_the_start_up_import_wait_for_the_thread_importing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "while held: False []" in lines  # both waited, and nothing of torchvision was imported
    assert "after: True ['admission', 'preload']" in lines


STOP_AT_ONCE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from service.app import start_service
from service.settings import Settings

settings = Settings(state_dir=sys.argv[1], data_root=sys.argv[1], port=0, torchserve_enabled=False)
service = start_service(settings)
service.stop(drain=False)  # at once: the start-up import is still under way (torch, timm: seconds)
assert service.preload is not None
print("import under way after the stop:", service.preload.is_alive())
print("imported:", "timm" in sys.modules)
"""


@pytest.mark.slow
def test_a_stop_right_after_the_start_waits_for_the_start_up_import(tmp_path: Path) -> None:
    """The process exits after the stop: an import still under way then raced the interpreter's exit
    handlers (torch's unregistered its operators under it) and failed with a traceback in the log."""
    result = subprocess.run(
        [sys.executable, "-c", STOP_AT_ONCE, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "import under way after the stop: False" in result.stdout.splitlines()
    assert "imported: True" in result.stdout.splitlines()
    assert "Traceback" not in result.stderr


START_ON_A_TAKEN_PORT = """
import logging, socket, sys, threading
logging.basicConfig(level=logging.INFO)
from service.app import start_service
from service.settings import Settings

with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    settings = Settings(state_dir=sys.argv[1], data_root=sys.argv[1], host="127.0.0.1",
                        port=taken.getsockname()[1], torchserve_enabled=False)
    try:
        start_service(settings)
    except Exception as exc:
        print("start refused:", type(exc).__name__)
under_way = [t for t in threading.enumerate() if t.name == "preload-admission" and t.is_alive()]
print("import under way after the refused start:", bool(under_way))
"""


@pytest.mark.slow
def test_a_start_that_fails_waits_for_the_start_up_import(tmp_path: Path) -> None:
    """The process exits after a start that fails (the API's port taken), with the same race as above."""
    result = subprocess.run(
        [sys.executable, "-c", START_ON_A_TAKEN_PORT, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(line.startswith("start refused:") for line in result.stdout.splitlines()), result.stdout
    assert "import under way after the refused start: False" in result.stdout.splitlines()
    assert "Traceback" not in result.stderr
