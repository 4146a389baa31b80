"""The `python` TorchServe runs for each worker: asks the zygote (service.packaging.ts_zygote) for a
warm one, or execs the real Python when the zygote cannot be reached (a worker is never lost).

This file is copied into the launcher script TorchServeProcess writes (`write_launcher`), after a
shebang that runs it with `-IS` (no site, no environment: it must start in milliseconds), so it may
import the standard library only. It stays TorchServe's process for the worker: signals it gets go
to the worker, and it exits with the worker's exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time

HEADER = struct.Struct("!Q")  # as in ts_zygote
WORKER_SCRIPT = "model_service_worker.py"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def main(socket_path: str, python: str) -> None:
    """The launcher script's entry point: TorchServe's command line is sys.argv."""
    sys.exit(launch(socket_path, python, sys.argv[1:]))


def launch(socket_path: str, python: str, argv: list[str]) -> int:
    """Run `python argv...` through the zygote when argv is a TorchServe worker's command line."""
    if not argv or not argv[0].endswith(WORKER_SCRIPT):
        return _exec(python, argv, None)
    # Held back until the worker's pid is known and the forwarding is in place: the worker may start
    # (and TorchServe signal this process) before the zygote's answer is read, and a signal taken then
    # would kill this process by default, leaving the worker to be killed rather than stopped.
    inherited = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(10)
        connection.connect(socket_path)
        body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        socket.send_fds(connection, [HEADER.pack(len(body))], [0, 1, 2])
        connection.sendall(body)
        reader = connection.makefile("r")
        first = reader.readline().split()
        if len(first) != 2 or first[0] != "pid":
            raise OSError(f"the zygote answered {first!r}")
        pid = int(first[1])
    except OSError:
        return _exec(python, argv, inherited)  # no zygote (yet): a cold worker, as TorchServe would start it
    connection.settimeout(None)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    # the mask this process started with (a signal TorchServe's JVM blocks stays blocked); one held
    # back meanwhile is forwarded now
    signal.pthread_sigmask(signal.SIG_SETMASK, inherited)
    line = reader.readline().split()
    if len(line) == 2 and line[0] == "exit":
        return _exit_code(int(line[1]))
    # the zygote died: its children die with it (PR_SET_PDEATHSIG); wait for this one to be gone
    while _alive(pid):
        time.sleep(0.1)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exec(python: str, argv: list[str], mask: set[int | signal.Signals] | None) -> int:
    # (A warm worker is the zygote's child and has the zygote's mask, as the zygote was started with.)
    # The mask survives execv: the worker gets the one this process started with (`mask`; None: it is
    # unchanged), so a signal held back meanwhile is taken here, with its default action, as the fresh
    # worker would have taken it; one blocked by whoever started this process stays blocked.
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.execv(python, [python, *argv])
    return 1  # not reached: execv replaces this process


def _exit_code(code: int) -> int:
    # a worker killed by a signal: exit as a shell reports it, 128 + the signal number
    return 128 - code if code < 0 else code


def script(socket_path: str, python: str) -> str:
    """The launcher script's text: this module's source, run on `python` with the zygote's socket."""
    with open(__file__, encoding="utf-8") as source:
        body = source.read()
    return f'#!{python} -IS\n{body}\n\nif __name__ == "__main__":\n    main({socket_path!r}, {python!r})\n'
