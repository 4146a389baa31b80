"""The warm-worker launcher and zygote as real processes, without TorchServe: what a forked worker
gets (command line, environment, folder, stdio, exit code, signals) is what a fresh Python would get.
With TorchServe: tests/integration/test_warm_workers.py."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.packaging.ts_warm import WarmWorkers
from service.packaging.ts_zygote import HEADER

# Named like TorchServe's worker script: the launcher only sends that one to the zygote.
WORKER = """
import gc, json, os, signal, sys, time
if sys.argv[1] == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    print("waiting", flush=True)
    time.sleep(60)
ours = sorted(n for n in sys.modules if n.split(".")[0] in ("service", "handlers"))
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "foo": os.environ.get("FOO"),
                  "path": sys.path[:2], "torch": "torch" in sys.modules, "ours": ours, "pid": os.getpid(),
                  "frozen": gc.get_freeze_count()}))
sys.exit(int(sys.argv[2]))
"""
EXITS_7_ON_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmWorkers]:
    root = tmp_path_factory.mktemp("torchserve")
    (root / "tmp").mkdir()
    (root / "logs").mkdir()
    workers = WarmWorkers(root, root / "tmp", root / "logs")
    workers.write_launcher()
    workers.start(dict(os.environ))
    deadline = time.monotonic() + 180
    while not workers.is_warm() and time.monotonic() < deadline:
        assert workers.is_running(), (root / "logs" / "zygote.log").read_text()
        time.sleep(0.1)
    yield workers
    assert workers.is_running(), workers.log_file.read_text()[-2000:]  # no test's launcher brought it down
    workers.stop()
    assert not workers.socket.exists()


@pytest.fixture()
def worker_script(tmp_path: Path) -> Path:
    path = tmp_path / "ts" / "model_service_worker.py"
    path.parent.mkdir()
    path.write_text(WORKER)
    return path


def test_a_forked_worker_gets_the_launchers_command_environment_folder_and_exit_code(
    warm: WarmWorkers, worker_script: Path, tmp_path: Path
):
    extra = tmp_path / "extra"
    env = {**os.environ, "FOO": "bar", "PYTHONPATH": str(extra)}
    done = subprocess.run(
        [str(warm.launcher), str(worker_script), "run", "3"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == ["run", "3"]
    assert (seen["cwd"], seen["foo"]) == (str(tmp_path), "bar")
    assert seen["path"] == [str(worker_script.parent), str(extra)]  # as `python <script>` would have
    assert seen["torch"] is True  # forked warm: torch was imported before the worker started
    assert seen["ours"] == []  # an archive's handler imports its own copy of our modules
    # the zygote froze its imports before forking: the worker's full collections skip them (service.heap)
    assert seen["frozen"] > 100_000


def test_a_signal_to_the_launcher_reaches_the_worker(warm: WarmWorkers, worker_script: Path):
    launcher = subprocess.Popen(
        [str(warm.launcher), str(worker_script), "wait", "0"], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None and launcher.stdout.readline().strip() == "waiting"
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 7  # the worker's own SIGTERM handler decided the exit


def test_a_killed_launcher_takes_its_forked_worker_with_it(warm: WarmWorkers, worker_script: Path):
    launcher = subprocess.Popen(
        [str(warm.launcher), str(worker_script), "wait", "0"], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None and launcher.stdout.readline().strip() == "waiting"
    (worker,) = _zygote_children(warm)
    launcher.kill()
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 30
    while worker in _zygote_children(warm) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker not in _zygote_children(warm)


@pytest.mark.parametrize("left", ["after reading nothing", "after the worker's pid arrived unread"])
def test_a_launcher_gone_before_it_read_its_workers_pid_leaves_the_zygote_serving(
    warm: WarmWorkers, worker_script: Path, tmp_path: Path, left: str
):
    # What a launcher killed right after its request does (CI once caught a SIGTERM there): with the
    # answer unread in its socket the zygote's next read is a reset, without it the answer's write fails.
    read, write = os.pipe()
    request = json.dumps({"argv": [str(worker_script), "wait", "0"], "env": dict(os.environ),
                          "cwd": str(tmp_path)}).encode()  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as launcher:
        launcher.connect(str(warm.socket))
        socket.send_fds(launcher, [HEADER.pack(len(request))], [read, write, write])
        launcher.sendall(request)
        if left != "after reading nothing":
            launcher.settimeout(30)
            assert launcher.recv(64, socket.MSG_PEEK).startswith(b"pid ")
    os.close(write)
    # end of file once no copy of the worker's stdout is left: the zygote's (closed after the fork) and
    # the worker's (at its death); before that, "no children" could mean "not forked yet"
    assert _read_to_the_end(read, timeout=30)
    deadline = time.monotonic() + 30
    while _zygote_children(warm) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _zygote_children(warm) == []  # its worker was killed: nobody could have stopped it
    assert warm.is_warm(), warm.log_file.read_text()[-2000:]
    done = subprocess.run([str(warm.launcher), str(worker_script), "run", "4"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert json.loads(done.stdout)["torch"] is True  # still forked warm


def test_a_signal_before_the_zygote_answers_is_forwarded_once_the_worker_is_known(tmp_path: Path):
    # The zygote here is a stand-in, this test itself, so that it can hold its answer back while the
    # launcher is signalled; the worker is a real process that exits 7 on SIGTERM.
    stand_in = WarmWorkers(tmp_path, tmp_path, tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(stand_in.socket))
        listener.listen(1)
        listener.settimeout(60)
        worker_script = tmp_path / "model_service_worker.py"  # never run: the stand-in starts the worker
        launcher = subprocess.Popen([str(stand_in.write_launcher()), str(worker_script)])
        connection, _ = listener.accept()
        with connection:
            _, fds, _, _ = socket.recv_fds(connection, HEADER.size, 3)
            for fd in fds:
                os.close(fd)
            worker = subprocess.Popen(
                [sys.executable, "-c", EXITS_7_ON_SIGTERM], stdout=subprocess.PIPE, text=True
            )
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
            launcher.send_signal(signal.SIGTERM)  # before it knows its worker
            time.sleep(0.5)
            assert launcher.poll() is None  # held back, not taken with its default action
            connection.sendall(f"pid {worker.pid}\n".encode())
            assert worker.wait(timeout=30) == 7  # forwarded once the pid arrived
            connection.sendall(b"exit 7\n")
            assert launcher.wait(timeout=30) == 7


def test_without_a_zygote_the_launcher_runs_the_real_python(tmp_path: Path, worker_script: Path):
    cold = WarmWorkers(tmp_path, tmp_path, tmp_path)  # never started: no socket to reach
    launcher = cold.write_launcher()
    done = subprocess.run(
        [str(launcher), str(worker_script), "run", "5"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout)["torch"] is False  # a fresh interpreter
    other = subprocess.run([str(launcher), "-c", "import sys; print(sys.executable)"], capture_output=True,
                           text=True, timeout=60, check=True)  # fmt: skip
    assert other.stdout.strip() == sys.executable  # anything but a worker is not the zygote's business


def test_a_cold_worker_keeps_the_signal_mask_the_launcher_was_started_with(tmp_path: Path):
    # TorchServe's JVM (or whatever starts it) may block a signal; the launcher blocks the forwarded
    # ones while it asks the zygote, and must hand the worker the mask it got, not one with them unblocked.
    cold = WarmWorkers(tmp_path, tmp_path, tmp_path)  # never started: the cold path
    script = tmp_path / "model_service_worker.py"
    script.write_text(
        "import re\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'SigBlk:\\s*([0-9a-f]+)', status).group(1), 16))\n"
    )
    # what starts the launcher blocks SIGHUP, then execs it (the mask survives execv)
    blocks_sighup = (
        "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP}); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocks_sighup, str(cold.write_launcher()), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    blocked = {signum for signum in range(1, 65) if int(done.stdout) >> (signum - 1) & 1}
    assert signal.SIGHUP in blocked  # as it was started
    assert signal.SIGTERM not in blocked  # the launcher's own hold is gone


def _read_to_the_end(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    try:
        while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if not os.read(fd, 4096):
                return True
        return False
    finally:
        os.close(fd)


def _zygote_children(warm: WarmWorkers) -> list[int]:
    assert warm._popen is not None
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=", "--ppid", str(warm._popen.pid)], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in out.stdout.splitlines() if "Z" not in line.split()[1]]
