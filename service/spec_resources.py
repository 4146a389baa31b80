"""Where a job runs: nodes x processes per node, one process per GPU, and the rules that tie that to the
rest of the spec (training.device against the GPUs, the global batch against the world size).

Part of the job spec (service.spec), which checks these rules when it is validated; admission
(service.jobs.admission) decides afterwards what this machine or cluster can actually give.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpecSection(BaseModel):
    """The base of every section of the job spec (service.spec): frozen, no unknown fields."""

    # allow_inf_nan=False: an infinite or NaN number is never a setting, and JSON cannot carry it back out
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


class ResourcesSpec(SpecSection):
    """What the job gets from the machine(s): nodes x processes per node, one process per GPU.

    `gpus_per_node` is the scale-out name; `gpus` is the same number under its older name (one node:
    the job's GPUs). Either may be given, both are recorded, and they must agree.
    """

    gpus: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs for the job on each node, distinct from other running jobs'; 0: train on the CPU. "
        "Default: 1 where the service has GPUs, 0 on a CPU-only machine (resolved when the job is created)",
    )
    gpus_per_node: int | None = Field(None, ge=0, le=64, description="the same number as `gpus` (its alias)")
    nodes: int = Field(1, ge=1, le=1024, description="machines the job trains on (more than 1: Kubernetes)")
    processes_per_node: int | None = Field(
        None, ge=1, le=64, description="CPU jobs only: training processes per node (default 1)"
    )

    @model_validator(mode="before")
    @classmethod
    def _gpus_alias(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        gpus, per_node = data.get("gpus"), data.get("gpus_per_node")
        if gpus is not None and per_node is not None and gpus != per_node:
            raise ValueError(
                f"resources.gpus {gpus} and resources.gpus_per_node {per_node} name the same number "
                "(gpus is the older name): give one of them"
            )
        if gpus is None and per_node is None:
            return data
        number = per_node if gpus is None else gpus
        return {**data, "gpus": number, "gpus_per_node": number}

    @model_validator(mode="after")
    def _one_process_per_gpu(self) -> ResourcesSpec:
        if self.gpus and self.processes_per_node is not None and self.processes_per_node != self.gpus:
            raise ValueError(
                f"resources.processes_per_node {self.processes_per_node} with resources.gpus_per_node "
                f"{self.gpus}: a GPU job runs one process per GPU; leave processes_per_node out"
            )
        return self

    @property
    def processes(self) -> int:
        """Training processes on each node: one per GPU, or processes_per_node (default 1) on the CPU."""
        if self.gpus:
            return self.gpus
        return self.processes_per_node or 1

    @property
    def world_size(self) -> int:
        """Training processes in all (torch.distributed's WORLD_SIZE)."""
        return self.nodes * self.processes


def placement_problem(resources: ResourcesSpec, device: str, batch_size: int) -> str | None:
    """Why a job with `resources`, training on `device` with the global `batch_size`, cannot run as
    asked; None when it can."""
    gpus = resources.gpus
    if gpus and device == "cpu":
        return (
            f"resources.gpus {gpus} with training.device 'cpu' reserves GPUs the job would not use; "
            "set resources.gpus to 0, or training.device to 'auto'"
        )
    if gpus == 0 and device == "cuda":
        return (
            "training.device 'cuda' with resources.gpus 0: the worker would see no GPU; "
            "ask for resources.gpus >= 1, or use training.device 'auto' or 'cpu'"
        )
    world = resources.world_size
    if batch_size % world:
        return (
            f"training.batch_size {batch_size} is the global batch and must divide by "
            f"the world size {world} ({resources.nodes} node(s) x {resources.processes} "
            f"process(es)): each process takes batch_size / {world}; use a multiple of {world}, "
            f"e.g. {max(world, batch_size // world * world)}"
        )
    return None
