"""Which finished jobs export: a job trained with `serving.enabled: false` exports like any other.

`serving.enabled: false` says "do not serve it on this service"; training here and serving elsewhere
(KServe, plain TorchServe) is what an export is for, so it is not refused. The job's serving spec
still gives the exported batching.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import FailedPrecondition
from service.packaging.archiver import build_archive
from service.packaging.export import export_job
from service.packaging.model_store import ModelStore
from service.records import Job, JobResult, JobState
from service.serving_types import ExportRequest
from service.settings import Settings
from service.spec import JobSpec


def job_not_served(store: ModelStore, checkpoint: Path, state: JobState) -> Job:
    archive = build_archive(checkpoint, store.folder, "pets", "1")
    spec = JobSpec.model_validate(
        {
            "name": "pets",
            "model": {"architecture": "resnet18"},
            "data": {"path": "d"},
            "serving": {"enabled": False, "batch_size": 3, "max_batch_delay_ms": 9},
        }
    )
    result = JobResult(archive_path=str(archive.path), archive_sha256=archive.sha256)
    return Job("job-1", spec, state, 1.0, 1.0, result=result)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    settings = Settings(state_dir=tmp_path / "state")
    settings.model_store.mkdir(parents=True)
    return ModelStore(settings)


def test_a_succeeded_job_with_serving_disabled_exports_with_its_own_batching(
    store: ModelStore, serving_checkpoint: Path, tmp_path: Path
) -> None:
    job = job_not_served(store, serving_checkpoint, JobState.SUCCEEDED)
    done = export_job(job, ExportRequest(job_id=job.id, target=tmp_path / "out"), store)
    assert done.files == ("config/config.properties", "model-store/pets.mar")
    config = (tmp_path / "out" / "config" / "config.properties").read_text()
    snapshot = json.loads(config.split("model_snapshot=", 1)[1].splitlines()[0])
    assert snapshot["models"]["pets"]["1"]["batchSize"] == 3
    assert snapshot["models"]["pets"]["1"]["maxBatchDelay"] == 9


def test_the_state_rule_still_holds_for_it(
    store: ModelStore, serving_checkpoint: Path, tmp_path: Path
) -> None:
    job = job_not_served(store, serving_checkpoint, JobState.FAILED)
    with pytest.raises(FailedPrecondition, match="only a SUCCEEDED job"):
        export_job(job, ExportRequest(job_id=job.id, target=tmp_path / "out"), store)
    assert not (tmp_path / "out").exists()
