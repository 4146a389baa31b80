"""A DDP job through the real service: torchrun with two CPU ranks on gloo, reporting over the internal
API, packaged. Slow: two ranks start torch and join a process group."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import (
    all_events,
    channel_to,
    make_image_folder,
    make_settings,
    running_service,
    spec,
    stub,
    wait_event,
    wait_state,
)
from reliability import record

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.app import Service, start_service
from service.jobs.store import JobStore
from service.records import JobState
from service.training.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

TWO_RANKS = {"gpus": 0, "processes_per_node": 2}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("ddp-service")
    settings = make_settings(root, report_heartbeat_s=0.2)
    make_image_folder(settings.data_root / "ds", per_class=16)  # 24 to train, 8 to validate
    with running_service(settings) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with channel_to(service) as ch:
        yield ch


def job_processes(job_id: str) -> list[int]:
    """Processes whose command line names the job (torchrun and its ranks)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if job_id.encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.removeprefix(b"RANK=")) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_a_two_process_job_succeeds_with_one_set_of_checkpoints_and_events(
    service: Service, channel: grpc.Channel
) -> None:
    client = stub(channel)
    job = client.CreateJob(
        pb.CreateJobRequest(spec=spec("ddp", training={"epochs": 2, "batch_size": 8}, resources=TWO_RANKS))
    )
    final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
    assert final.state == pb.SUCCEEDED, final.error
    assert final.attempts == 1 and final.result.epochs_completed == 2
    assert Path(final.result.archive_path).is_file()
    events = all_events(client, job.id)
    ddp = [e for e in events if e.kind == "INFO" and e.message.startswith("DDP over 2 processes (gloo)")]
    assert len(ddp) == 1 and "4 images per process per step, global batch 8" in ddp[0].message
    # rank 0 alone reports and writes
    assert [e.kind for e in events].count("EPOCH") == 2 and [e.kind for e in events].count("CHECKPOINT") == 2
    checkpoints = Path(final.result.checkpoint_dir)
    names = sorted(p.name for p in checkpoints.iterdir())
    assert len(names) == 3 and names[0] == "best.pt" and names[2] == "last.pt"  # keep_top_k 1: one epoch file
    log = (service.settings.job_dir(job.id) / "worker.log").read_text()
    assert "rank 0 of 2 joined" in log and "rank 1 of 2 joined" in log
    assert job_processes(job.id) == []


def test_a_two_process_frozen_prefix_job_caches_its_features_on_every_rank(
    service: Service, channel: grpc.Channel
) -> None:
    client = stub(channel)
    request = pb.CreateJobRequest(
        spec=spec(
            "ddp-cache",
            freeze={"until_layer": "features.12"},
            training={"epochs": 2, "batch_size": 8, "augmentation": "none", "feature_cache": True},
            resources=TWO_RANKS,
        )
    )
    job = client.CreateJob(request)
    final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
    assert final.state == pb.SUCCEEDED, final.error
    cached = [e for e in all_events(client, job.id) if e.kind == "INFO" and "cached the frozen" in e.message]
    assert len(cached) == 1 and cached[0].data["images"] == 24  # every training image, once, from both shards
    log = (service.settings.job_dir(job.id) / "worker.log").read_text()
    assert "rank 1 of 2 joined" in log


@pytest.mark.reliability
def test_cancel_stops_both_ranks(service: Service, channel: grpc.Channel) -> None:
    client = stub(channel)
    job = client.CreateJob(
        pb.CreateJobRequest(
            spec=spec("ddp-cancel", training={"epochs": 500, "batch_size": 8}, resources=TWO_RANKS)
        )
    )
    wait_event(client, job.id, "EPOCH", timeout=180)
    assert len(job_processes(job.id)) >= 3  # torchrun and two ranks
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    final = wait_state(client, job.id, (pb.CANCELLED, pb.FAILED, pb.SUCCEEDED), timeout=60)
    assert final.state == pb.CANCELLED, final.error
    deadline = time.monotonic() + 10
    while job_processes(job.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_processes(job.id) == []
    record(
        "distributed", "cancel a 2-rank DDP job mid-training", 1, "CANCELLED; torchrun and both ranks gone"
    )


@pytest.mark.reliability
def test_a_rank_killed_mid_training_is_retried_and_ends_like_an_uninterrupted_run(
    service: Service, channel: grpc.Channel
) -> None:
    client = stub(channel)
    training = {"epochs": 3, "batch_size": 8, "augmentation": "light", "seed": 7}

    def create(name: str) -> pb.Job:
        request = pb.CreateJobRequest(spec=spec(name, training=training, resources=TWO_RANKS))
        return client.CreateJob(request)

    straight = create("ddp-straight")
    assert wait_state(client, straight.id, (pb.SUCCEEDED, pb.FAILED), timeout=240).state == pb.SUCCEEDED
    job = create("ddp-killed")
    wait_event(client, job.id, "CHECKPOINT", timeout=180)
    victims = [pid for pid in job_processes(job.id) if rank_of(pid) == 1]
    assert victims, "rank 1 not found"
    os.kill(victims[0], signal.SIGKILL)
    final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
    assert final.state == pb.SUCCEEDED, final.error
    assert final.attempts == 2  # the whole job, both ranks, retried once
    events = all_events(client, job.id)
    assert any(e.kind == "INFO" and "resumed from" in e.message for e in events)

    def weights(j: pb.Job) -> dict[str, object]:
        directory = Path(client.GetJob(pb.GetJobRequest(job_id=j.id)).result.checkpoint_dir)
        return load_checkpoint(directory / "last.pt")["model"]  # type: ignore[no-any-return]

    expected, got = weights(straight), weights(job)
    for key, tensor in expected.items():
        assert (got[key] == tensor).all(), key  # type: ignore[attr-defined]
    record(
        "distributed",
        "SIGKILL one rank of a 2-rank DDP job after its first checkpoint",
        1,
        "the whole job retried once (attempts 2), resumed from last.pt, SUCCEEDED with weights equal bit "
        "for bit to an uninterrupted 2-rank run",
    )


@pytest.mark.reliability
def test_a_sigkill_to_torchrun_leaves_no_rank_behind(service: Service, channel: grpc.Channel) -> None:
    client = stub(channel)
    job = client.CreateJob(
        pb.CreateJobRequest(
            spec=spec("ddp-orphans", training={"epochs": 3, "batch_size": 8}, resources=TWO_RANKS)
        )
    )
    wait_event(client, job.id, "EPOCH", timeout=180)
    processes = job_processes(job.id)
    ranks = [pid for pid in processes if rank_of(pid) is not None]
    torchrun = [
        pid for pid in processes if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(ranks) == 2 and len(torchrun) == 1
    os.kill(torchrun[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and rank_of(pid) is not None for pid in ranks):
        assert time.monotonic() < deadline, "a rank outlived torchrun"
        time.sleep(0.1)
    final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
    assert final.state == pb.SUCCEEDED and final.attempts == 2, final.error
    record(
        "distributed",
        "SIGKILL torchrun (the launcher) of a 2-rank DDP job",
        1,
        "both ranks ended within 10 s (parent-death signal); the job retried once and SUCCEEDED",
    )


@pytest.mark.reliability
def test_a_drain_stops_both_ranks_at_a_safe_point_and_requeues_the_job(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("ddp-drain")
    settings = make_settings(root, report_heartbeat_s=0.2)
    make_image_folder(settings.data_root / "ds", per_class=16)
    running = start_service(settings)
    try:
        with channel_to(running) as channel:
            client = stub(channel)
            request = pb.CreateJobRequest(
                spec=spec("ddp-drain", training={"epochs": 500, "batch_size": 8}, resources=TWO_RANKS)
            )
            job = client.CreateJob(request)
            wait_event(client, job.id, "EPOCH", timeout=180)
    finally:
        running.stop(drain=True)
    store = JobStore(settings.jobs_db)
    try:
        assert store.get_job(job.id).state == JobState.QUEUED  # resumes after a restart
    finally:
        store.close()
    assert job_processes(job.id) == []
    log = (settings.job_dir(job.id) / "worker.log").read_text()
    assert "training stopped (draining)" in log
    record(
        "distributed",
        "drain the service (SIGTERM to torchrun) during a 2-rank DDP job",
        1,
        "both ranks stopped at the same step, no process left, the job QUEUED to resume after a restart",
    )
