"""The training processes of one job, as torch.distributed sees them: who this rank is, and the few
collectives the run needs (agree on a stop, average metrics, rank 0's decision, a barrier).

Every launcher runs the same entry point (service.worker_app); this module reads only what torch's
launchers set (RANK, LOCAL_RANK, WORLD_SIZE; MASTER_ADDR/MASTER_PORT are read by the env:// rendezvous)
and nothing launcher-specific. World size 1 (no such variables, the local launcher) is today's path:
no process group is made and every collective below returns its input unchanged.

gloo on the CPU, NCCL on CUDA. Every collective runs under the group's timeout, so a dead or stuck
peer fails the job with a message naming the collective instead of hanging it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from service.errors import FailedPrecondition
from service.records import EventKind
from service.stop_reasons import STOP_REASONS  # what a stop request says; any other: "stopped"
from service.training.reporting import Reporter

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0  # a collective waits this long for a peer before the job fails


class PeerLost(RuntimeError):
    """A collective failed: another rank died or hung. Not the job's fault: the job is retried whole."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's training processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Ranks:
        """RANK, LOCAL_RANK and WORLD_SIZE as torchrun (or Kubeflow Trainer's torchrun) sets them."""
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK {rank} and WORLD_SIZE {world}: a rank is 0..WORLD_SIZE-1")
        return cls(rank, int(environ.get("LOCAL_RANK", "0")), world)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, writes checkpoints, TensorBoard and W&B."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


class Group:
    """The job's process group (none at world size 1) and the collectives training uses."""

    def __init__(self, ranks: Ranks, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.ranks = ranks
        self.timeout_s = timeout_s
        self.backend: str | None = None

    def start(self, device_type: str) -> Group:
        """Join the group over env:// (MASTER_ADDR/PORT): NCCL for CUDA, gloo for the CPU."""
        if not self.ranks.distributed or dist.is_initialized():
            return self
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(self.ranks.local_rank)  # one GPU per process, by its local rank
        dist.init_process_group(
            self.backend,
            rank=self.ranks.rank,
            world_size=self.ranks.world_size,
            timeout=timedelta(seconds=self.timeout_s),
        )
        log.info("%s joined the process group (%s)", self.ranks.describe(), self.backend)
        return self

    def close(self) -> None:
        if self.ranks.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` under DistributedDataParallel (gradients averaged over the ranks), or itself."""
        if not self.ranks.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.ranks.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def any(self, flag: bool, what: str) -> bool:
        """True on every rank when it is true on any."""
        if not self.ranks.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        self._run(what, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
        return bool(value.item())

    def from_main(self, flag: bool, what: str) -> bool:
        """Rank 0's `flag`, on every rank (its decision: early stopping)."""
        if not self.ranks.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        self._run(what, lambda: dist.broadcast(value, src=0))
        return bool(value.item())

    def mean(self, metrics: Mapping[str, float], count: int, what: str) -> dict[str, float]:
        """Each metric averaged over every rank's `count` items (sum of metric x count, / total count),
        so every rank reports the same numbers; NaN where no rank counted any."""
        if not self.ranks.distributed:
            return dict(metrics)
        keys = sorted(metrics)
        weighted = [metrics[k] * count if count else 0.0 for k in keys]
        values = torch.tensor([*weighted, float(count)], dtype=torch.float64)
        self._run(what, lambda: dist.all_reduce(values, op=dist.ReduceOp.SUM))
        total = values[-1].item()
        return {k: values[i].item() / total if total else float("nan") for i, k in enumerate(keys)}

    def agree_stop(self, local: str | None) -> str | None:
        """A stop reason on every rank when any rank has one (this rank's own first): all stop at once."""
        if not self.ranks.distributed:
            return local
        value = torch.tensor([float(_stop_code(local))])
        self._run("agreeing on a stop", lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
        return _stop_reason(local, int(value.item()))

    def agree_step(self, local_stop: str | None, empty: bool) -> tuple[str | None, bool]:
        """Both per-step agreements in one all-reduce (one round trip per training step, not two): the
        stop reason, as agree_stop gives it, and whether any rank's batch is empty, as `any` gives it."""
        if not self.ranks.distributed:
            return local_stop, empty
        # both are "the largest over the ranks": one MAX over [stop code, empty]
        value = torch.tensor([float(_stop_code(local_stop)), 1.0 if empty else 0.0])
        self._run(
            "agreeing on a stop and on skipping a batch whose images all failed to decode",
            lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX),
        )
        return _stop_reason(local_stop, int(value[0].item())), bool(value[1].item())

    def gather(self, items: list[T], what: str) -> list[T]:
        """Every rank's `items`, rank 0's first, on every rank (small picklable things: skipped files)."""
        if not self.ranks.distributed:
            return list(items)
        gathered: list[list[T] | None] = [None] * self.ranks.world_size
        self._run(what, lambda: dist.all_gather_object(gathered, items))
        return [item for part in gathered for item in part or []]

    def gather_rows(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's `tensor`, rank 0's first, on every rank; the ranks' row counts may differ, the
        other dimensions not (padded to the longest for the all-gather, cut back after)."""
        if not self.ranks.distributed:
            return [tensor]
        counts = self.gather([len(tensor)], f"{what} (row counts)")
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in counts]
        self._run(what, lambda: dist.all_gather(parts, padded))
        return [part[:count] for part, count in zip(parts, counts, strict=True)]

    def barrier(self, what: str) -> None:
        if self.ranks.distributed:
            self._run(what, lambda: dist.barrier())

    @contextmanager
    def peers_watched(self, what: str) -> Iterator[None]:
        """Turn a backend's error inside the block (DDP's gradient all-reduce in backward) into PeerLost."""
        try:
            yield
        except PeerLost:
            raise
        except RuntimeError as exc:
            if not self.ranks.distributed or not _from_the_backend(exc):
                raise
            raise self._lost(what, exc) from exc

    def _run(self, what: str, collective: Callable[[], T]) -> T:
        try:
            return collective()
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection or the timeout passed
            raise self._lost(what, exc) from exc

    def _lost(self, what: str, exc: RuntimeError) -> PeerLost:
        return PeerLost(
            f"{self.ranks.describe()}: {what} failed: a peer process died or did not answer within "
            f"{self.timeout_s:.0f} s ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        )


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Replace `model`'s BatchNorm layers, in place, by SyncBatchNorm (statistics over the global batch);
    returns how many. Only on NCCL: check_sync_batchnorm first."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:  # the root itself was a BatchNorm: no model this service builds
        raise ValueError("the model's root module is a BatchNorm layer; it cannot be converted in place")
    return sum(1 for m in model.modules() if isinstance(m, nn.SyncBatchNorm))


def check_sync_batchnorm(group: Group) -> None:
    """FailedPrecondition unless SyncBatchNorm can run in `group`: several ranks on NCCL. Admission
    refuses such specs; this catches a job whose device resolved to the CPU after all."""
    if group.ranks.distributed and group.backend == "nccl":
        return
    where = f"the {group.backend} backend" if group.backend else "a single process"
    raise FailedPrecondition(
        f"training.sync_batchnorm is set but this job runs on {where}: SyncBatchNorm runs only with "
        "several CUDA processes on NCCL (not on the CPU's gloo); set training.sync_batchnorm false, or "
        "train on 2 or more GPUs"
    )


def _stop_code(reason: str | None) -> int:
    """A stop reason as a number for a MAX all-reduce: 0 none, 1.. a known reason, one past them any other."""
    if not reason:
        return 0
    return STOP_REASONS.index(reason) + 1 if reason in STOP_REASONS else len(STOP_REASONS) + 1


def _stop_reason(local: str | None, agreed: int) -> str | None:
    """The reason this rank stops for, given the group's largest code: its own first."""
    if agreed == 0:
        return None
    return local or (STOP_REASONS[agreed - 1] if agreed <= len(STOP_REASONS) else "stopped")


def _from_the_backend(exc: RuntimeError) -> bool:
    """A process-group failure: NCCL raises DistError, gloo a RuntimeError that names itself."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "gloo" in text or "Connection reset by peer" in text


class RankReporter:
    """The training's Reporter on one rank: rank 0 reports, the others keep quiet; a stop request seen
    by any rank stops them all at the same step (a rank that left alone would hang its peers)."""

    def __init__(self, inner: Reporter, group: Group) -> None:
        self.inner, self.group = inner, group

    def event(self, kind: EventKind, message: str, data: dict[str, Any] | None = None) -> None:
        if self.group.ranks.is_main:
            self.inner.event(kind, message, data)

    def result(self, **fields: Any) -> None:
        if self.group.ranks.is_main:
            self.inner.result(**fields)

    def stop_requested(self) -> str | None:
        return self.group.agree_stop(self.inner.stop_requested())

    def stop_or_skip(self, empty: bool) -> tuple[str | None, bool]:
        """stop_requested() and whether any rank's batch is `empty`, agreed in one collective (per step)."""
        return self.group.agree_step(self.inner.stop_requested(), empty)
