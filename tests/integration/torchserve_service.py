"""A real tuneserve service with its real TorchServe on free loopback ports, for the serving tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from harness import make_settings, running_service

from service.app import Service
from tests.ports import torchserve_ports


@contextmanager
def running_torchserve_service(root: Path, **overrides: Any) -> Iterator[Service]:
    """start_service with TorchServe enabled (5 free ports, a 256 MB heap), stopped with the service."""
    settings = make_settings(
        root,
        torchserve_enabled=True,
        **torchserve_ports(),
        torchserve_java_heap="256m",
        torchserve_start_timeout_s=180,
        **overrides,
    )
    # One torch thread per process, here (the promotion gate) and in TorchServe's workers (which inherit
    # the environment): on a busy shared CPU, spinning OpenMP threads make inference ~50x slower.
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with running_service(settings) as service:
            yield service
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
