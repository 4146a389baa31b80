"""Start TorchServe (ts.model_server) with another `python` for its workers: the warm-worker launcher.

TorchServe's launcher hands the JVM its own interpreter (`--python sys.executable`), which overrides
config.properties' `python`; this runs the same launcher with sys.executable set to our launcher
script, so the JVM starts every Python worker through it (service.packaging.ts_zygote).
Usage: python -m service.packaging.ts_start <launcher script> <ts.model_server arguments...>
"""

from __future__ import annotations

import sys


def main() -> None:
    launcher, *arguments = sys.argv[1:]
    sys.executable = launcher
    sys.argv = ["torchserve", *arguments]
    from ts.model_server import start

    start()


if __name__ == "__main__":
    main()
