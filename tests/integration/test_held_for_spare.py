"""A queued job waits for the spare worker that is on its way instead of paying a launch
(LocalProcessLauncher.worth_waiting, the scheduler's tick): it stays QUEUED while the spare imports, the
spare is told to skip its delay, a cancel meanwhile costs no process, and a spare that dies meanwhile
leaves the job to start cold.

Everything is real: the service on loopback, spare and worker processes, their pipes and /proc. The
spares here wait SPARE_HELD_DELAY_S before importing (the delay a spare made after a hand-over has,
made long): a job that starts well within it can only have started because the spare was told to hurry.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil
import pytest
from procs import running

from service.api import convert
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.app import Service, start_service
from service.jobs import local_launcher as local_launcher_module
from service.jobs.launcher import worker_env
from service.jobs.local_launcher import SPARE_LOG, LocalProcessLauncher
from service.jobs.spare_worker import SPARE_FLAG, SpareWorker
from service.jobs.store import JobStore
from service.jobs.torchrun_launcher import TorchrunLauncher
from service.records import Job
from service.settings import Settings
from tests.integration.harness import channel_to, make_image_folder, make_settings, spec, stub, wait_for

SPARE_HELD_DELAY_S = 60.0
STARTS_WITHIN_S = 40.0  # well under the delay: imports take ~3-10 s on a (busy) 2-core CPU
READY_LINE = "spare worker ready"


@pytest.fixture
def slow_spares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spare the launcher makes waits SPARE_HELD_DELAY_S before importing, unless told to hurry."""

    def spare(argv: list[str], env: Mapping[str, str], log_path: Path, delay_s: float = 0.0) -> SpareWorker:
        return SpareWorker(argv, env, log_path, SPARE_HELD_DELAY_S)

    monkeypatch.setattr(local_launcher_module, "SpareWorker", spare)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    make_image_folder(tmp_path / "data" / "ds", per_class=4)
    return make_settings(tmp_path)


@pytest.fixture
def service(settings: Settings, slow_spares: None) -> Iterator[Service]:
    service = start_service(settings)
    try:
        yield service
    finally:
        service.stop(drain=False)


def launcher_of(service: Service) -> LocalProcessLauncher:
    single = service.scheduler.launcher.single  # type: ignore[attr-defined]  # ByWorldSize
    assert isinstance(single, LocalProcessLauncher)
    return single


def spares_started() -> set[int]:
    """This process's children that were started as spares (alive or not yet reaped)."""
    found = set()
    for child in psutil.Process().children():
        try:
            if SPARE_FLAG in child.cmdline():
                found.add(child.pid)
        except psutil.Error:
            continue
    return found


def ready_lines(settings: Settings) -> int:
    log = settings.state_dir / SPARE_LOG
    return log.read_text().count(READY_LINE) if log.exists() else 0


def watch_while(
    condition: Callable[[], bool], sample: Callable[[], tuple[str, ...]], timeout: float
) -> list[tuple[str, ...]]:
    """`sample()` every 20 ms until `condition()` holds (or fail after `timeout`)."""
    seen: list[tuple[str, ...]] = []
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out; seen {seen[-5:]}"
        seen.append(sample())
        time.sleep(0.02)
    return seen


def test_a_job_submitted_while_the_spare_waits_stays_queued_and_then_runs_on_that_spare(
    service: Service, settings: Settings
) -> None:
    spare = wait_for(launcher_of(service).spare_pid, 30, "a spare worker")
    assert ready_lines(settings) == 0  # in its delay
    with channel_to(service) as channel:
        client = stub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("held", training={"epochs": 50})))

        def sample() -> tuple[str, ...]:
            ready = "ready" if ready_lines(settings) else "importing"
            return ready, pb.JobState.Name(client.GetJob(pb.GetJobRequest(job_id=job.id)).state)

        seen = watch_while(lambda: service.store.worker_ref(job.id) is not None, sample, STARTS_WITHIN_S)
        assert ready_lines(settings) == 1  # handed over once the spare was ready, not before
    assert ("importing", "QUEUED") in seen, seen  # it waited, unclaimed, while the spare imported
    assert ("importing", "RUNNING") not in seen, seen  # never claimed before the spare was ready
    assert service.store.worker_ref(job.id) == str(spare)  # and then it ran on that spare
    assert spares_started() <= {spare, launcher_of(service).spare_pid()}  # no process but the next spare


def test_a_job_cancelled_while_it_waits_costs_no_launch_and_the_spare_takes_the_next_job(
    service: Service, settings: Settings
) -> None:
    spare = wait_for(launcher_of(service).spare_pid, 30, "a spare worker")
    with channel_to(service) as channel:
        client = stub(channel)
        first = client.CreateJob(pb.CreateJobRequest(spec=spec("cancelled")))
        time.sleep(0.5)  # several scheduler ticks: it is held, not claimed
        assert client.GetJob(pb.GetJobRequest(job_id=first.id)).state == pb.QUEUED
        client.CancelJob(pb.CancelJobRequest(job_id=first.id))
        assert client.GetJob(pb.GetJobRequest(job_id=first.id)).state == pb.CANCELLED
        assert service.store.worker_ref(first.id) is None  # no worker was ever started for it
        assert launcher_of(service).spare_pid() == spare and running(spare)
        assert spares_started() == {spare}  # no second process

        # the spare was told to hurry for the first job: the next one runs on it, long before its delay
        second = client.CreateJob(pb.CreateJobRequest(spec=spec("next", training={"epochs": 50})))
        ref = wait_for(lambda: service.store.worker_ref(second.id), STARTS_WITHIN_S, "the next job's worker")
    assert ref == str(spare)


def test_a_spare_that_dies_while_a_job_waits_leaves_the_job_to_start_cold(
    service: Service, settings: Settings
) -> None:
    spare = wait_for(launcher_of(service).spare_pid, 30, "a spare worker")
    with channel_to(service) as channel:
        client = stub(channel)
        job = client.CreateJob(pb.CreateJobRequest(spec=spec("orphaned", training={"epochs": 50})))
        time.sleep(0.3)
        assert client.GetJob(pb.GetJobRequest(job_id=job.id)).state == pb.QUEUED
        os.killpg(spare, signal.SIGKILL)
        ref = wait_for(lambda: service.store.worker_ref(job.id), 20, "the job's worker")
        assert client.GetJob(pb.GetJobRequest(job_id=job.id)).state == pb.RUNNING
    assert ref != str(spare) and running(int(ref))
    assert launcher_of(service).spare_pid() not in (None, spare)  # and the next spare is on its way


def a_job(settings: Settings) -> Job:
    store = JobStore(settings.jobs_db)
    try:
        return store.create_job(convert.spec_from_proto(spec("asked")))
    finally:
        store.close()


def test_worth_waiting_only_for_a_fitting_spare_on_its_way_and_only_for_a_while(
    tmp_path: Path, slow_spares: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    env = worker_env(settings)
    job = a_job(settings)
    launcher = LocalProcessLauncher(settings)
    try:
        wait_for(launcher.spare_pid, 10, "a spare")
        assert not launcher.worth_waiting(job, {**env, "OMP_NUM_THREADS": "7"})  # another env: cold at once
        assert launcher.worth_waiting(job, env)  # fits, not ready: wait (and it was told to hurry)
        monkeypatch.setattr(local_launcher_module, "SPARE_READY_WAIT_S", 0.0)
        assert not launcher.worth_waiting(job, env)  # waited past the bound: hand it over as it is
        monkeypatch.setattr(local_launcher_module, "SPARE_READY_WAIT_S", 600.0)
        wait_for(lambda: not launcher.worth_waiting(job, env) or None, STARTS_WITHIN_S, "a ready spare")
        assert ready_lines(settings) == 1  # ready after the nudge, long before its delay ended
    finally:
        launcher.close()
    assert not launcher.worth_waiting(job, env)  # closed: no spare is coming


def test_nothing_is_worth_waiting_for_without_spares(tmp_path: Path) -> None:
    cold = make_settings(tmp_path / "cold", warm_workers=0)
    job = a_job(cold)
    assert not LocalProcessLauncher(cold).worth_waiting(job, worker_env(cold))
    warm = make_settings(tmp_path / "torchrun")
    assert not TorchrunLauncher(warm).worth_waiting(job, worker_env(warm))  # torchrun never uses a spare
