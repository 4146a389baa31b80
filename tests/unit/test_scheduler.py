"""The scheduler with stand-in workers (fake_worker.py) launched as local processes that report through
the real internal reporting API: exits, retries, cancel, capacity, drain, heartbeats."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.api.reporting_server import ReportingServer, start_reporting_server
from service.errors import Unauthenticated
from service.jobs.intake import Intake
from service.jobs.launcher import worker_env
from service.jobs.local_launcher import LocalProcessLauncher, describe_exit
from service.jobs.scheduler import Scheduler
from service.jobs.store import JobStore
from service.jobs.store_open import store_target
from service.records import EventKind, Job, JobState
from service.settings import Settings
from service.spec import JobSpec

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_command(job_id: str) -> list[str]:
    return [sys.executable, str(FAKE_WORKER), "--job-id", job_id]


def make_spec(name: str, serve: bool = False, gpus: int | None = None) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": name,
            "model": {"architecture": "resnet18"},
            "data": {"path": "ds"},
            "serving": {"enabled": serve},
            "training": {"batch_size": 48},  # divides by every GPU count used here (the world size)
            "resources": {"gpus": gpus},
        }
    )


class Harness:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        values = {"state_dir": tmp_path / "state", "max_concurrent_jobs": 1, "max_job_retries": 1,
                  "cancel_grace_s": 1.0, "drain_grace_s": 5.0, **settings}  # fmt: skip
        self.settings = Settings(**values)
        self.store = JobStore(store_target(self.settings))  # the SQLite file unless database_url is set
        self.deployed: list[str] = []
        self.deploy_error: Exception | None = None
        self.intake = Intake(self.store)
        self.reporting: ReportingServer = start_reporting_server(self.settings, self.intake)
        self.scheduler = self.new_scheduler(deployer=self.deploy)

    def new_scheduler(self, **kwargs: Any) -> Scheduler:
        launcher = LocalProcessLauncher(self.settings, command=fake_command)
        return Scheduler(
            self.settings, self.store, launcher, self.intake, self.reporting.address, poll_s=0.05, **kwargs
        )

    def close(self) -> None:
        self.reporting.stop()
        self.store.close()

    def deploy(self, job: Job) -> None:
        if self.deploy_error is not None:
            raise self.deploy_error
        self.deployed.append(job.id)

    def create(self, name: str, serve: bool = False, gpus: int | None = None) -> str:
        job_id = self.store.create_job(make_spec(name, serve, gpus)).id
        self.scheduler.wake()
        return job_id

    def wait(self, check: Callable[[], Any], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def wait_state(self, job_id: str, state: JobState, timeout: float = 30.0) -> Job:
        self.wait(lambda: self.store.get_job(job_id).state == state, timeout)
        return self.store.get_job(job_id)

    def wait_started(self, job_id: str) -> None:
        self.wait(lambda: any(e.message == "fake worker started" for e in self.store.events_after(job_id)))

    def visible_devices(self, job_id: str) -> list[str | None]:
        """CUDA_VISIBLE_DEVICES as each attempt's worker process saw it."""
        events = self.store.events_after(job_id)
        return [e.data["cuda_visible_devices"] for e in events if e.message == "fake worker started"]

    def messages(self, job_id: str, kind: EventKind) -> list[str]:
        return [e.message for e in self.store.events_after(job_id) if e.kind == kind]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    h.scheduler.start()
    yield h
    h.scheduler.stop(drain=False)
    h.close()


def test_a_packaged_job_is_deployed_then_succeeds(harness: Harness) -> None:
    job_id = harness.create("ok-served", serve=True)
    harness.wait_state(job_id, JobState.SUCCEEDED)
    assert harness.deployed == [job_id]


def test_a_job_that_asks_not_to_be_served_succeeds_without_deploying(harness: Harness) -> None:
    job_id = harness.create("ok-unserved", serve=False)
    harness.wait_state(job_id, JobState.SUCCEEDED)
    assert harness.deployed == []


def test_a_failing_deploy_fails_the_job_with_the_reason(harness: Harness) -> None:
    harness.deploy_error = RuntimeError("TorchServe said no")
    job = harness.wait_state(harness.create("ok-bad-deploy", serve=True), JobState.FAILED)
    assert job.error is not None and "serving failed: RuntimeError: TorchServe said no" in job.error


def test_a_killed_worker_is_retried_then_the_job_fails_with_the_reason(harness: Harness) -> None:
    job = harness.wait_state(harness.create("crash"), JobState.FAILED)
    assert job.error == "worker killed by SIGKILL (exit -9) (out of memory?), 2 attempts"
    assert job.attempts == 2
    [warning] = harness.messages(job.id, EventKind.WARNING)
    assert "retrying from the last checkpoint (attempt 2 of 2)" in warning


def test_a_worker_exiting_with_an_error_code_is_retried_too(harness: Harness) -> None:
    job = harness.wait_state(harness.create("exit3"), JobState.FAILED)
    assert job.error is not None and job.error.startswith("worker exited with code 3")


def test_a_job_the_worker_failed_is_not_retried(harness: Harness) -> None:
    job = harness.wait_state(harness.create("fail"), JobState.FAILED)
    assert (job.error, job.attempts) == ("ValueError: boom", 1)


def test_cancel_stops_a_running_worker_at_a_safe_point(harness: Harness) -> None:
    job_id = harness.create("slow")
    harness.wait_started(job_id)
    harness.store.request_cancel(job_id)
    harness.scheduler.wake()
    harness.wait_state(job_id, JobState.CANCELLED)
    assert "fake worker stopping" in harness.messages(job_id, EventKind.INFO)


def test_the_worker_learns_from_its_heartbeat_whether_a_stop_is_a_cancel_or_a_drain(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.scheduler.start()
    cancelled = h.create("slow-cancelled")
    h.wait_started(cancelled)
    h.store.request_cancel(cancelled)
    h.scheduler.wake()
    h.wait_state(cancelled, JobState.CANCELLED)
    drained = h.create("slow-drained")
    h.wait_started(drained)
    h.scheduler.stop(drain=True)
    reasons = {
        job_id: [
            e.data["reason"] for e in h.store.events_after(job_id) if e.message == "fake worker stopping"
        ]
        for job_id in (cancelled, drained)
    }
    assert reasons == {cancelled: ["cancelled"], drained: ["draining"]}
    h.close()


def test_a_worker_whose_heartbeats_stop_is_killed_and_retried_as_a_crash(tmp_path: Path) -> None:
    h = Harness(tmp_path, report_heartbeat_s=0.1, worker_silence_s=1.0)
    h.scheduler.start()
    try:
        job = h.wait_state(h.create("frozen"), JobState.FAILED)
        assert job.error is not None and job.error.startswith("worker sent no heartbeat for")
        assert job.attempts == 2 and "2 attempts" in job.error
    finally:
        h.scheduler.stop(drain=False)
        h.close()


def test_a_workers_token_is_revoked_when_it_exits(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    issued: list[str] = []
    issue = h.intake.issue
    h.intake.issue = lambda job_id: issued.append(issue(job_id)) or issued[-1]  # type: ignore[method-assign]
    h.scheduler.start()
    try:
        job_id = h.create("ok-revoked")
        h.wait_state(job_id, JobState.SUCCEEDED)
        with pytest.raises(Unauthenticated):
            h.intake.heartbeat(issued[0], job_id)
    finally:
        h.scheduler.stop(drain=False)
        h.close()


def test_cancel_kills_a_worker_that_ignores_sigterm_after_the_grace_period(harness: Harness) -> None:
    job_id = harness.create("stubborn")
    harness.wait_started(job_id)
    started = time.monotonic()
    harness.store.request_cancel(job_id)
    harness.wait_state(job_id, JobState.CANCELLED)
    assert time.monotonic() - started >= harness.settings.cancel_grace_s
    assert "fake worker stopping" not in harness.messages(job_id, EventKind.INFO)


def test_at_most_max_concurrent_jobs_run_and_the_rest_wait_in_order(harness: Harness) -> None:
    first, second, third = harness.create("slow-1"), harness.create("ok-2"), harness.create("ok-3")
    harness.wait_started(first)
    time.sleep(0.3)
    assert harness.scheduler.running() == [first]
    assert harness.store.get_job(second).state == JobState.QUEUED
    harness.store.request_cancel(first)
    harness.wait_state(third, JobState.SUCCEEDED)
    second_job, third_job = harness.store.get_job(second), harness.store.get_job(third)
    assert second_job.started_at is not None and third_job.started_at is not None
    assert second_job.started_at < third_job.started_at


def test_drain_requeues_running_jobs_without_counting_the_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.scheduler.start()
    job_id = h.create("slow")
    h.wait_started(job_id)
    h.scheduler.stop(drain=True)
    job = h.store.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert "fake worker stopping" in h.messages(job_id, EventKind.INFO)
    h.close()


def test_a_restarted_scheduler_resumes_requeued_jobs(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    job_id = h.store.create_job(make_spec("ok-after-restart")).id
    h.store.transition(job_id, JobState.RUNNING)  # as if the previous service died mid-job
    h.scheduler.start()
    h.wait_state(job_id, JobState.SUCCEEDED)
    assert any("the service restarted" in m for m in h.messages(job_id, EventKind.INFO))
    h.scheduler.stop()
    h.close()


@pytest.mark.parametrize(
    ("code", "text"),
    [(-signal.SIGKILL, "worker killed by SIGKILL (exit -9)"), (-signal.SIGSEGV, "SIGSEGV"), (2, "code 2")],
)
def test_exits_are_described_for_people(code: int, text: str) -> None:
    assert text in describe_exit(code)


def test_workers_get_every_setting_but_secrets_with_absolute_paths(tmp_path: Path) -> None:
    settings = Settings(state_dir=Path("rel/state"), auth_token="s3cret", max_concurrent_jobs=3)  # type: ignore[arg-type]
    env = worker_env(settings)
    assert env["TUNESERVE_STATE_DIR"] == str(Path("rel/state").resolve())
    assert env["TUNESERVE_MAX_CONCURRENT_JOBS"] == "3"
    assert env["TUNESERVE_TORCHSERVE_ENABLED"] == "true"
    assert "TUNESERVE_AUTH_TOKEN" not in env


# ---------------------------------------------------------------------- GPUs: one set per worker


@pytest.fixture
def four_gpus(tmp_path: Path) -> Iterator[Harness]:
    """A machine with 4 GPUs (TUNESERVE_GPU_COUNT: no GPU here) and room for 4 jobs at once."""
    h = Harness(tmp_path, gpu_count=4, max_concurrent_jobs=4)
    h.scheduler.start()
    yield h
    h.scheduler.stop(drain=False)
    h.close()


def test_running_workers_see_distinct_gpus_and_a_cpu_job_sees_none(four_gpus: Harness) -> None:
    h = four_gpus
    pair, single, cpu = h.create("slow-pair", gpus=2), h.create("slow-single"), h.create("slow-cpu", gpus=0)
    for job_id in (pair, single, cpu):
        h.wait_started(job_id)
    seen = {job_id: h.visible_devices(job_id) for job_id in (pair, single, cpu)}
    assert seen == {pair: ["0,1"], single: ["2"], cpu: [""]}  # the default is one GPU
    assert h.scheduler.devices_held() == {pair: (0, 1), single: (2,)}


def test_the_oldest_job_waits_for_its_gpus_and_younger_ones_wait_behind_it(four_gpus: Harness) -> None:
    h = four_gpus
    three = h.create("slow-three", gpus=3)
    h.wait_started(three)
    pair, single = h.create("slow-pair", gpus=2), h.create("slow-single", gpus=1)
    time.sleep(0.5)  # many ticks: one GPU is free, yet neither starts (oldest first, no backfilling)
    assert [h.store.get_job(j).state for j in (pair, single)] == [JobState.QUEUED, JobState.QUEUED]
    assert h.visible_devices(pair) == [] == h.visible_devices(single)
    h.store.request_cancel(three)
    h.wait_started(pair)
    h.wait_started(single)
    assert h.visible_devices(pair) == ["0,1"] and h.visible_devices(single) == ["2"]


@pytest.mark.parametrize(
    ("name", "final"),
    [
        ("ok", JobState.SUCCEEDED),  # packaged and exited 0
        ("fail", JobState.FAILED),  # the worker recorded FAILED
        ("crash", JobState.FAILED),  # SIGKILL, retried once, then FAILED
        ("exit3", JobState.FAILED),  # an exit code, retried once, then FAILED
    ],
)
def test_gpus_are_freed_whatever_the_worker_exit(tmp_path: Path, name: str, final: JobState) -> None:
    h = Harness(tmp_path, gpu_count=1)
    h.scheduler.start()
    try:
        first = h.wait_state(h.create(f"{name}-first"), final)
        after = h.create("ok-after")  # would wait forever if the only GPU had leaked
        h.wait_state(after, JobState.SUCCEEDED)
        assert set(h.visible_devices(first.id)) == {"0"} and h.visible_devices(after) == ["0"]
        assert h.scheduler.devices_held() == {}
    finally:
        h.scheduler.stop(drain=False)
        h.close()


def test_gpus_are_freed_when_a_job_is_cancelled(tmp_path: Path) -> None:
    h = Harness(tmp_path, gpu_count=1)
    h.scheduler.start()
    try:
        stubborn = h.create("stubborn")  # ignores SIGTERM: freed only after the SIGKILL
        h.wait_started(stubborn)
        h.store.request_cancel(stubborn)
        h.scheduler.wake()
        h.wait_state(stubborn, JobState.CANCELLED)
        after = h.create("ok-after")
        h.wait_state(after, JobState.SUCCEEDED)
        assert h.visible_devices(after) == ["0"] and h.scheduler.devices_held() == {}
    finally:
        h.scheduler.stop(drain=False)
        h.close()


def test_a_drain_frees_the_gpus_and_the_job_gets_them_again_after_a_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path, gpu_count=1)
    h.scheduler.start()
    job_id = h.create("slow-drained")
    h.wait_started(job_id)
    h.scheduler.stop(drain=True)
    assert h.scheduler.devices_held() == {} and h.store.get_job(job_id).state == JobState.QUEUED
    restarted = h.new_scheduler()
    restarted.start()
    try:
        h.wait(lambda: len(h.visible_devices(job_id)) == 2)
        assert h.visible_devices(job_id) == ["0", "0"]
    finally:
        restarted.stop(drain=False)
        h.close()


def test_gpu_indices_follow_the_services_own_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # the service itself was given GPUs 5 and 7
    h = Harness(tmp_path, gpu_count=2, max_concurrent_jobs=2)
    h.scheduler.start()
    try:
        first, second = h.create("slow-a"), h.create("slow-b")
        h.wait_started(first)
        h.wait_started(second)
        assert (h.visible_devices(first), h.visible_devices(second)) == (["5"], ["7"])
    finally:
        h.scheduler.stop(drain=False)
        h.close()


def test_a_job_asking_more_gpus_than_the_service_now_has_fails_instead_of_waiting(tmp_path: Path) -> None:
    h = Harness(tmp_path, gpu_count=1)  # admitted when the machine had more GPUs
    h.scheduler.start()
    try:
        job = h.wait_state(h.create("ok-big", gpus=2), JobState.FAILED)
        assert job.error is not None and "resources.gpus 2" in job.error and "1 GPU(s)" in job.error
        h.wait_state(h.create("ok-next"), JobState.SUCCEEDED)
    finally:
        h.scheduler.stop(drain=False)
        h.close()


def test_a_worker_that_cannot_be_given_its_gpus_fails_the_job_instead_of_leaving_it_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # fewer GPUs visible than the 2 the settings claim
    h = Harness(tmp_path, gpu_count=2, max_concurrent_jobs=2)
    h.scheduler.start()
    try:
        h.create("slow-a")
        second = h.wait_state(h.create("ok-b"), JobState.FAILED)  # GPU 1 has no entry in "5"
        assert second.error is not None and "could not start a worker" in second.error
    finally:
        h.scheduler.stop(drain=False)
        h.close()
