"""The adapter between the API's Serving protocol and service.packaging's ServingManager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.app import TorchServeServing
from service.errors import FailedPrecondition
from service.jobs.records import Job, JobResult, JobState
from service.jobs.spec import JobSpec


class FakeManager:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def deploy(self, job_id: str, archive: Path, sha256: str, serving: Any, *, checkpoint: Path) -> Any:
        self.calls.append((job_id, archive, sha256, serving.top_k, checkpoint))

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


def test_deploy_hands_over_the_archive_its_hash_and_the_best_checkpoint() -> None:
    manager = FakeManager()
    packaged = job(archive_path="/s/pets-v1.mar", archive_sha256="ab", best_checkpoint="/j/best.pt")
    TorchServeServing(manager).deploy(packaged)
    assert manager.calls == [("job-1", Path("/s/pets-v1.mar"), "ab", 2, Path("/j/best.pt"))]


def test_deploy_without_an_archive_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="job-1 has no archive"):
        TorchServeServing(FakeManager()).deploy(job(best_checkpoint="/j/best.pt"))


def test_predict_names_the_model_and_passes_defaults_as_the_managers_zero_values() -> None:
    manager = FakeManager()
    result = TorchServeServing(manager).predict("pets", None, [b"a", b"b"], None)
    assert (result.model, result.predictions) == ("pets", ("p", "p"))
    assert manager.calls == [("pets", "", 0)]
