"""resources: gpus_per_node is gpus' alias, processes per node and nodes make the world size, and the
global batch must divide by it."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import InvalidArgument
from service.spec import JobSpec, parse_spec


def job(resources: dict[str, Any], batch_size: int = 32, device: str = "auto") -> JobSpec:
    return parse_spec(
        {
            "name": "r",
            "model": {"architecture": "resnet18", "weights": "none"},
            "data": {"path": "ds"},
            "training": {"batch_size": batch_size, "device": device},
            "resources": resources,
        }
    )


def test_gpus_per_node_and_gpus_are_recorded_as_one_number() -> None:
    assert job({"gpus_per_node": 2}).resources.gpus == 2
    assert job({"gpus": 2}).resources.gpus_per_node == 2
    assert job({"gpus": 2, "gpus_per_node": 2}).resources.world_size == 2


def test_the_world_size_is_nodes_times_processes_per_node() -> None:
    assert job({}).resources.world_size == 1
    assert job({"gpus": 0, "processes_per_node": 2}, device="cpu").resources.world_size == 2
    assert job({"gpus": 4, "nodes": 2}).resources.world_size == 8


def test_a_gpu_job_runs_one_process_per_gpu() -> None:
    with pytest.raises(InvalidArgument, match=r"processes_per_node 3 with resources\.gpus_per_node 2"):
        job({"gpus": 2, "processes_per_node": 3})


def test_a_global_batch_that_does_not_divide_by_the_world_size_is_refused_naming_the_numbers() -> None:
    with pytest.raises(InvalidArgument) as refused:
        job({"gpus": 4, "nodes": 2}, batch_size=36)
    assert "training.batch_size 36" in str(refused.value)
    assert "world size 8 (2 node(s) x 4 process(es))" in str(refused.value)
    assert "e.g. 32" in str(refused.value)


def test_a_spec_written_before_scale_out_still_parses_with_world_size_one() -> None:
    old = job({"gpus": 1}, batch_size=33)
    assert old.resources.nodes == 1 and old.resources.world_size == 1
