"""GPU assignment: the allocator, the GPU layout the settings give, a job's GPU request and its limit."""

from __future__ import annotations

import pytest

from service.devices import (
    DeviceAllocator,
    check_gpus_fit,
    requested_gpus,
    visible_devices,
    with_resolved_gpus,
)
from service.errors import ResourceExhausted
from service.settings import Settings
from service.spec import JobSpec


def job(gpus: int | None = None, device: str = "auto") -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "j",
            "model": {"architecture": "resnet18"},
            "data": {"path": "ds"},
            # the global batch divides by every GPU count used here (it must divide by the world size)
            "training": {"device": device, "batch_size": 48},
            "resources": {"gpus": gpus},
        }
    )


def test_jobs_get_distinct_devices_and_wait_when_too_few_are_free() -> None:
    allocator = DeviceAllocator(range(4))
    assert allocator.acquire("a", 2) == (0, 1)
    assert allocator.acquire("b", 1) == (2,)
    assert allocator.acquire("c", 2) is None  # one free: c waits, holding nothing
    assert allocator.held() == {"a": (0, 1), "b": (2,)}
    assert allocator.release("a") == (0, 1)
    assert allocator.acquire("c", 2) == (0, 1)
    assert allocator.free() == (3,)


def test_releasing_twice_or_a_job_holding_nothing_is_harmless() -> None:
    allocator = DeviceAllocator(range(2))
    allocator.acquire("a", 2)
    assert allocator.release("a") == (0, 1) and allocator.release("a") == () and allocator.release("x") == ()
    assert allocator.free() == (0, 1)


def test_a_cpu_job_holds_no_device_and_asking_for_more_than_exist_is_a_bug() -> None:
    allocator = DeviceAllocator([0])
    assert allocator.acquire("cpu", 0) == () and allocator.held() == {}
    with pytest.raises(ValueError, match="2 devices asked for, only 1 exist"):
        allocator.acquire("big", 2)


def test_the_serving_gpu_is_the_last_one_by_default_and_shared_with_training() -> None:
    settings = Settings(gpu_count=4)
    assert settings.serving_gpu_indices == (3,) and settings.training_gpus == (0, 1, 2, 3)
    assert settings.resolved_max_concurrent_jobs() == 4


def test_serving_gpus_can_be_kept_away_from_training() -> None:
    settings = Settings(gpu_count=4, serving_gpus="1, 3", train_on_serving_gpus=False)
    assert settings.serving_gpu_indices == (1, 3) and settings.training_gpus == (0, 2)


def test_a_cpu_only_machine_serves_and_trains_on_the_cpu() -> None:
    settings = Settings(gpu_count=0)
    assert settings.serving_gpu_indices == () and settings.training_gpus == ()
    assert settings.resolved_max_concurrent_jobs() == 1
    assert Settings(gpu_count=2, serving_gpus="").serving_gpu_indices == ()  # empty: TorchServe on the CPU


def test_a_serving_gpu_the_machine_lacks_is_named_with_the_gpus_it_has() -> None:
    with pytest.raises(
        ValueError, match=r"names GPU 5, but this machine has 2 GPU\(s\) \(indices \[0, 1\]\)"
    ):
        _ = Settings(gpu_count=2, serving_gpus="0,5").serving_gpu_indices


@pytest.mark.parametrize(
    ("gpus_on_machine", "spec", "expected"),
    [
        (2, job(), 1),  # default where there are GPUs
        (0, job(), 0),  # default on a CPU-only machine
        (2, job(device="cpu"), 0),  # a CPU job holds no GPU
        (4, job(gpus=3), 3),
    ],
)
def test_the_default_request_is_resolved_and_recorded(
    gpus_on_machine: int, spec: JobSpec, expected: int
) -> None:
    settings = Settings(gpu_count=gpus_on_machine)
    assert requested_gpus(spec, settings) == expected
    assert with_resolved_gpus(spec, settings).resources.gpus == expected


def test_more_gpus_than_the_service_trains_on_is_resource_exhausted_naming_the_numbers() -> None:
    check_gpus_fit(job(gpus=2), Settings(gpu_count=2))
    with pytest.raises(ResourceExhausted) as error:
        check_gpus_fit(job(gpus=2), Settings(gpu_count=2, train_on_serving_gpus=False))
    assert error.value.message == (
        "resources.gpus 2 is more than the 1 GPU(s) this service trains on (it has 2; GPU(s) [1] are "
        "reserved for serving (TUNESERVE_SERVING_GPUS) and TUNESERVE_TRAIN_ON_SERVING_GPUS is false); "
        "ask for at most 1, or 0 to train on the CPU"
    )


def test_worker_device_lists_are_numbered_as_the_service_sees_its_gpus() -> None:
    assert visible_devices((0, 2), None) == "0,2"
    assert visible_devices((), None) == ""  # hides every GPU
    assert visible_devices((1,), "4,5") == "5"
    assert visible_devices((0,), "GPU-1a2b, GPU-3c4d") == "GPU-1a2b"
