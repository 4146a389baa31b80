"""Warm TorchServe workers: a process with torch, torchvision and TorchServe's worker already imported
forks each new Python worker, so registering a version skips seconds of imports in a fresh interpreter.

TorchServe starts a worker as `<python> <ts>/model_service_worker.py --sock-type unix ...`, with the
`python` TorchServe's launcher passes the JVM (its own sys.executable; service.packaging.ts_start
replaces it with the launcher script, service.packaging.ts_launcher). The launcher hands its command
line, environment, folder and stdin/stdout/stderr to this zygote over a Unix socket; the zygote forks,
the child takes them over and runs model_service_worker.py as `__main__`, exactly what the fresh
interpreter would have run. The launcher stays TorchServe's process for that worker: it forwards
signals to the child and exits with the child's exit code. Only third-party modules are imported
here, never ours: an archive's handler imports its own copy of tuneserve's code (handler_runtime).

What makes it safe to leave running:
- a launcher that cannot reach the zygote (not started yet, still importing, dead) execs the real
  Python, as TorchServe would have: a worker is never lost, only cold;
- the launcher's death (TorchServe stopping or scaling down with SIGKILL) closes its connection, and
  the zygote kills that child; the zygote's death kills its children (PR_SET_PDEATHSIG) and their
  launchers exit, so TorchServe sees those workers die and restarts them (cold, until the zygote is back);
- the zygote ends with the service (it watches its parent) and forks from one thread only (no lock held
  by another thread is inherited), and it never runs a torch operation (no OpenMP pool to inherit).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = struct.Struct("!Q")  # the length of the JSON request that follows the header and its 3 fds
PRELOAD = (
    "torch",
    "torchvision",
    "torchvision.transforms.v2",
    "PIL.Image",
    "ts.model_service_worker",
    "ts.torch_handler.base_handler",
)
REAP_INTERVAL_S = 0.2
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends `sig` to this process when the process (thread) that made it exits."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def preload() -> None:
    for module in PRELOAD:
        __import__(module)
    # Before any fork: the workers' full collections then skip the ~500,000 objects these imports made
    # (a 160-390 ms pause each, measured in the service) and leave the pages shared with this process
    # uncopied (Python's gc.freeze documentation; service.heap says the same for the service). The
    # collection after it walks next to nothing and paces the workers' full collections by what is not
    # frozen (see service.heap.freeze_imports).
    gc.freeze()
    gc.collect()


def serve(socket_path: Path) -> None:
    """Accept launchers until SIGTERM; one forked child per launcher (single-threaded, see above)."""
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))  # bound after the imports: until then launchers go cold
    os.chmod(socket_path, 0o600)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> its launcher's connection
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()
    log.info("warm TorchServe worker zygote ready on %s (pid %d)", socket_path, os.getpid())
    while not stopping and os.getppid() == parent:  # it ends with the service that started it
        for key, _ in selector.select(timeout=REAP_INTERVAL_S):
            if key.fileobj is listener:
                connection, _ = listener.accept()
                pid = _spawn(connection, listener, selector)
                if pid is not None:
                    children[pid] = connection
                    selector.register(connection, selectors.EVENT_READ, pid)
                continue
            # a launcher's connection is readable only when it closed: the launcher is gone
            pid = key.data
            if _closed(children[pid]):
                selector.unregister(children[pid])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap(children, selector)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    socket_path.unlink(missing_ok=True)


def _closed(connection: socket.socket) -> bool:
    try:
        return not connection.recv(1)
    except OSError:  # reset: the launcher died before it read its worker's pid
        return True


def _reap(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is None:
            continue
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(connection)
        with contextlib.suppress(OSError):
            connection.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
        connection.close()


def _spawn(
    connection: socket.socket, listener: socket.socket, selector: selectors.BaseSelector
) -> int | None:
    """Read one launcher's request and fork its worker; None (connection closed) when it is malformed."""
    try:
        connection.settimeout(10)
        raw, fds, _, _ = socket.recv_fds(connection, HEADER.size, 3)
        if len(raw) != HEADER.size or len(fds) != 3:
            raise ValueError(f"a launcher sent {len(raw)} header bytes and {len(fds)} fds")
        (length,) = HEADER.unpack(raw)
        body = b""
        while len(body) < length:
            chunk = connection.recv(length - len(body))
            if not chunk:
                raise ValueError("a launcher closed its connection mid-request")
            body += chunk
        request = json.loads(body)
        connection.settimeout(None)
    except (OSError, ValueError) as exc:
        log.warning("refused a launcher: %s", exc)
        connection.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        selector.close()
        listener.close()
        _become_worker(request, fds, connection)  # never returns
    for fd in fds:
        os.close(fd)
    try:
        connection.sendall(f"pid {pid}\n".encode())
    except OSError:  # the launcher died after its request: nobody is left to forward to its worker
        log.warning("a launcher left before its worker (pid %d) started; killing the worker", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid  # reaped as any other, and its connection closed then


def _become_worker(request: dict, fds: list[int], connection: socket.socket) -> None:
    """In the forked child: take the launcher's stdio, folder and environment, run the worker script."""
    code = 1
    try:
        die_with_parent()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        connection.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        ours = _path_entries(os.environ.get("PYTHONPATH", ""))
        os.environ.clear()
        os.environ.update(request["env"])
        # the path a fresh `python <script>` would have: the script's folder, then $PYTHONPATH, then the
        # interpreter's own (site-packages)
        base = [p for p in sys.path[1:] if p not in ours]
        script_dir = os.path.dirname(os.path.realpath(request["argv"][0]))
        sys.path[:] = [script_dir, *_path_entries(os.environ.get("PYTHONPATH", "")), *base]
        # tuneserve's own modules (this one's package) are forgotten: the archive's handler imports its
        # own copy of them from the archive (handler_runtime), never the service's
        for name in [n for n in sys.modules if n.split(".")[0] in ("service", "handlers")]:
            del sys.modules[name]
        _apply_threads()
        logging.root.handlers.clear()  # the worker configures logging to its stdout itself
        sys.argv = list(request["argv"])
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _path_entries(value: str) -> list[str]:
    return [os.path.abspath(p) for p in value.split(os.pathsep) if p]


def _apply_threads() -> None:
    # OpenMP read the zygote's environment when torch was imported; the worker's may say otherwise
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        import torch

        torch.set_num_threads(int(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    preload()
    serve(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
