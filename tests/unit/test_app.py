"""The adapter between the API's Serving protocol and service.packaging's ServingManager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.app import TorchServeServing
from service.errors import FailedPrecondition
from service.packaging.serving import ServingManager
from service.records import Job, JobResult, JobState
from service.settings import Settings
from service.spec import JobSpec


class FakeManager:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def deploy_job(self, job: Job) -> Any:
        self.calls.append(("deploy_job", job.id))

    def predict(self, model: str, version: str, images: Any, top_k: int = 0) -> list[str]:
        self.calls.append((model, version, top_k))
        return ["p"] * len(images)


def job(**result: Any) -> Job:
    spec = JobSpec.model_validate(
        {
            "name": "pets",
            "model": {"architecture": "resnet18"},
            "data": {"path": "d"},
            "serving": {"top_k": 2},
        }
    )
    return Job("job-1", spec, JobState.PACKAGING, 1.0, 1.0, result=JobResult(**result))


def test_deploy_hands_the_whole_job_to_the_manager_which_gates_on_its_images() -> None:
    manager = FakeManager()
    packaged = job(archive_path="/s/pets-v1.mar", archive_sha256="ab", best_checkpoint="/j/best.pt")
    TorchServeServing(manager).deploy(packaged)
    assert manager.calls == [("deploy_job", "job-1")]


def test_deploy_without_an_archive_is_a_failed_precondition(tmp_path: Path) -> None:
    manager = ServingManager(Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data"))
    with pytest.raises(FailedPrecondition, match="job-1 has no archive"):
        TorchServeServing(manager).deploy(job(best_checkpoint="/j/best.pt"))


def test_predict_names_the_model_and_passes_defaults_as_the_managers_zero_values() -> None:
    manager = FakeManager()
    result = TorchServeServing(manager).predict("pets", None, [b"a", b"b"], None)
    assert (result.model, result.predictions) == ("pets", ("p", "p"))
    assert manager.calls == [("pets", "", 0)]
