"""Which GPUs each job's worker gets: resolved at admission, handed out by the scheduler.

A job asks for `resources.gpus` (default: 1 where the service has training GPUs, 0 on a CPU-only
machine; the resolved number is recorded in the stored spec). The scheduler takes distinct device
indices from a DeviceAllocator when it starts the worker and gives them back when the worker exits,
whatever the exit (success, crash, cancel, drain, retry). The worker sees only its own devices through
CUDA_VISIBLE_DEVICES (so it trains on cuda:0 of what it sees); a CPU job sees none.

Queueing is strictly oldest first: when the oldest queued job's GPUs are busy, it waits and younger
jobs wait behind it (no backfilling), so a job asking for many GPUs is never starved by small ones.
Nothing can wait forever: admission refuses a job that asks for more GPUs than the service trains on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from service.errors import ResourceExhausted
from service.settings import Settings
from service.spec import JobSpec

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def requested_gpus(spec: JobSpec, settings: Settings) -> int:
    """The GPUs a job asked for (per node), its default resolved: 1 when there are training GPUs (this
    machine's, or the cluster's with the Kubernetes launcher) and the job may use one (training.device
    is not cpu), else 0."""
    if spec.resources.gpus is not None:
        return spec.resources.gpus
    if settings.launcher == "kubernetes":  # the cluster's GPUs, whatever this machine has
        return 0 if spec.training.device == "cpu" else 1
    return 1 if settings.training_gpus and spec.training.device != "cpu" else 0


def with_resolved_gpus(spec: JobSpec, settings: Settings) -> JobSpec:
    """`spec` with resources.gpus set to the number the job gets, so the stored spec records it."""
    gpus = requested_gpus(spec, settings)
    resources = spec.resources.model_copy(update={"gpus": gpus, "gpus_per_node": gpus})
    return spec.model_copy(update={"resources": resources})


def check_gpus_fit(spec: JobSpec, settings: Settings) -> None:
    """ResourceExhausted when the job asks for more GPUs than this service can ever give one job."""
    asked, training = requested_gpus(spec, settings), settings.training_gpus
    if asked <= len(training):
        return
    reserved = [i for i in settings.gpus if i not in training]
    why = (
        f"; GPU(s) {reserved} are reserved for serving (TUNESERVE_SERVING_GPUS) and "
        "TUNESERVE_TRAIN_ON_SERVING_GPUS is false"
        if reserved
        else ""
    )
    raise ResourceExhausted(
        f"resources.gpus {asked} is more than the {len(training)} GPU(s) this service trains on "
        f"(it has {len(settings.gpus)}{why}); ask for at most {len(training)}, or 0 to train on the CPU"
    )


def visible_devices(indices: Sequence[int], parent: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a worker given `indices`, numbered as this process sees its GPUs.

    When this process itself runs under CUDA_VISIBLE_DEVICES (`parent`, e.g. "4,5"), its index 1 is the
    parent's second entry ("5"), not the machine's GPU 1. An empty result hides every GPU.
    """
    if parent is None or not parent.strip():
        return ",".join(str(i) for i in indices)
    entries = [entry.strip() for entry in parent.split(",")]
    return ",".join(entries[i] for i in indices)


class DeviceAllocator:
    """Hands out distinct device indices to jobs; thread-safe."""

    def __init__(self, devices: Iterable[int]) -> None:
        self._devices = tuple(devices)
        self._held: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    @property
    def devices(self) -> tuple[int, ...]:
        return self._devices

    def acquire(self, job_id: str, count: int) -> tuple[int, ...] | None:
        """`count` free devices for `job_id` (lowest indices first), or None when not enough are free now.

        A job holds one set at a time: acquiring again returns what it holds when the count matches.
        """
        if count > len(self._devices):
            raise ValueError(f"{count} devices asked for, only {len(self._devices)} exist")
        if count == 0:
            return ()  # a CPU job holds nothing
        with self._lock:
            held = self._held.get(job_id)
            if held is not None:
                if len(held) != count:
                    raise ValueError(f"job {job_id} already holds devices {list(held)}")
                return held
            busy = {i for indices in self._held.values() for i in indices}
            free = [i for i in self._devices if i not in busy]
            if len(free) < count:
                return None
            self._held[job_id] = tuple(free[:count])
            return self._held[job_id]

    def release(self, job_id: str) -> tuple[int, ...]:
        """Give back what `job_id` holds (nothing is fine: releasing twice is harmless)."""
        with self._lock:
            return self._held.pop(job_id, ())

    def held(self) -> Mapping[str, tuple[int, ...]]:
        with self._lock:
            return dict(self._held)

    def free(self) -> tuple[int, ...]:
        with self._lock:
            busy = {i for indices in self._held.values() for i in indices}
            return tuple(i for i in self._devices if i not in busy)
