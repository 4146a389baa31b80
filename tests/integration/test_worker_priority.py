"""Workers leave the CPU to the service: a spare runs settings.worker_nice nicer than the service, and a
spare waiting out its delay has not imported torch yet (the CPUs are the job just started's).

Real spare processes (python -m service.worker_app --spare), observed through psutil and /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.jobs.launcher import worker_env
from service.jobs.local_launcher import worker_command
from service.jobs.spare_worker import SpareWorker, spare_argv
from tests.integration.harness import make_settings, wait_for


@pytest.fixture
def spares() -> Iterator[list[SpareWorker]]:
    started: list[SpareWorker] = []
    yield started
    for spare in started:
        spare.close()


def start_spare(tmp_path: Path, spares: list[SpareWorker], nice: int, delay_s: float) -> SpareWorker:
    settings = make_settings(tmp_path, worker_nice=nice)
    argv = spare_argv(worker_command(""))
    spare = SpareWorker(argv, worker_env(settings), tmp_path / "spare.log", delay_s)
    spares.append(spare)
    return spare


def test_a_spare_runs_worker_nice_nicer_than_the_service(tmp_path: Path, spares: list[SpareWorker]) -> None:
    ours = os.nice(0)
    spare = start_spare(tmp_path, spares, nice=7, delay_s=60)
    process = psutil.Process(spare.pid)
    wait_for(lambda: process.nice() == ours + 7 or None, 60, "the spare to lower its priority")


def test_a_spare_waiting_out_its_delay_has_not_imported_torch(
    tmp_path: Path, spares: list[SpareWorker]
) -> None:
    """It lowers its priority first thing in main(): whatever it imported by then, it imported before
    its delay. torch (libtorch) must not be among it."""
    ours = os.nice(0)
    spare = start_spare(tmp_path, spares, nice=3, delay_s=60)
    process = psutil.Process(spare.pid)
    wait_for(lambda: process.nice() == ours + 3 or None, 60, "the spare to reach main()")
    mapped = Path(f"/proc/{spare.pid}/maps").read_text()
    assert "libtorch" not in mapped
    assert spare.popen.poll() is None  # still waiting: its delay is not over
