"""Run a module under an audit hook that ends the process (exit 86) the moment it opens a job store.

    python audited.py service.worker_app --job-id job-...

Any `open` or `sqlite3.connect` of a file named jobs.sqlite3 (or its -wal/-shm) counts, whatever folder
it is in: the hook needs no path, so the worker's environment and arguments carry none. At exit the
process prints which of the store's modules it had imported (`STORE MODULES: [...]`).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from typing import Any

EXIT_AUDIT = 86
STORE_FILE = "jobs.sqlite3"
WATCHED = ("open", "sqlite3.connect")
STORE_MODULES = ("service.jobs.store", "service.jobs.intake")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in WATCHED or not args or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = os.fsdecode(args[0])
    if STORE_FILE in os.path.basename(path):
        os.write(2, f"AUDIT: {event} of the job store {path}\n".encode())
        os._exit(EXIT_AUDIT)


def _report_modules() -> None:
    loaded = sorted(m for m in sys.modules if m in STORE_MODULES)
    sys.stdout.write(f"STORE MODULES: {json.dumps(loaded)}\n")
    sys.stdout.flush()


def install() -> None:
    sys.addaudithook(_hook)
    atexit.register(_report_modules)


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
