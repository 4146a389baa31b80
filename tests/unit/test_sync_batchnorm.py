"""training.sync_batchnorm: opt-in SyncBatchNorm for DDP on GPUs, refused where it cannot run (the CPU's
gloo backend, one process) with a message that says why, at the spec, at admission and in the worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch import nn

from service.api import convert
from service.errors import FailedPrecondition, InvalidArgument
from service.jobs.admission import admit
from service.settings import Settings
from service.spec import JobSpec, parse_spec
from service.training.distributed import Group, Ranks, check_sync_batchnorm, convert_sync_batchnorm


def job(resources: dict[str, Any], device: str = "auto") -> JobSpec:
    return parse_spec(
        {
            "name": "bn",
            "model": {"architecture": "resnet18", "weights": "none"},
            "data": {"path": "ds"},
            "training": {"batch_size": 32, "device": device, "sync_batchnorm": True},
            "resources": resources,
        }
    )


def test_it_is_off_unless_asked_for() -> None:
    spec = {"name": "x", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
    assert JobSpec.model_validate(spec).training.sync_batchnorm is False


def test_a_cpu_job_asking_for_it_is_refused_because_it_does_not_run_on_gloo() -> None:
    with pytest.raises(
        InvalidArgument, match=r"sync_batchnorm needs CUDA GPUs.*does not run on the CPU's gloo"
    ):
        job({"gpus": 0, "processes_per_node": 2}, device="cpu")
    with pytest.raises(InvalidArgument, match="gloo"):
        job({}, device="cpu")  # the GPUs left to the machine, but the device says CPU


def test_one_process_is_refused_since_there_is_nothing_to_synchronise() -> None:
    with pytest.raises(InvalidArgument, match=r"more than one training process \(world size 1"):
        job({"gpus": 1})


def test_several_gpus_may_ask_for_it_and_it_round_trips_through_the_proto() -> None:
    spec = job({"gpus_per_node": 2})
    assert spec.training.sync_batchnorm and job({"gpus": 1, "nodes": 2}).resources.world_size == 2
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert convert.spec_to_proto(spec).training.sync_batchnorm is True


def test_admission_refuses_it_once_the_machine_decided_the_gpus(tmp_path: Path) -> None:
    """resources.gpus left out: the spec alone cannot tell, admission resolves it on this machine (0 on a
    CPU machine: gloo; 1 on a GPU machine: one process) and refuses either with FAILED_PRECONDITION."""
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data", torch_home=tmp_path / "th")
    with pytest.raises(FailedPrecondition, match=r"^spec\.training\.sync_batchnorm needs"):
        admit(job({}), settings)


def test_the_worker_refuses_it_on_gloo_or_alone() -> None:
    """The backstop for a job whose device resolved to the CPU after admission."""
    with pytest.raises(FailedPrecondition, match="runs on a single process"):
        check_sync_batchnorm(Group(Ranks()))
    gloo = Group(Ranks(rank=0, local_rank=0, world_size=2))
    gloo.backend = "gloo"  # as start() sets it on the CPU; no process group is needed to refuse
    with pytest.raises(FailedPrecondition, match="runs on the gloo backend: SyncBatchNorm runs only"):
        check_sync_batchnorm(gloo)
    nccl = Group(Ranks(rank=0, local_rank=0, world_size=2))
    nccl.backend = "nccl"
    check_sync_batchnorm(nccl)


def test_every_batchnorm_layer_is_converted_in_place_keeping_its_weights_and_freezing() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    model[1].weight.requires_grad_(False)  # frozen before or after: the Parameter object is kept
    weight = model[1].weight
    assert convert_sync_batchnorm(model) == 2
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    assert model[1].weight is weight and not model[1].weight.requires_grad
