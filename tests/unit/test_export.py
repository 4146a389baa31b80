"""Exporting a packaged version as KServe's TorchServe storage layout: the folder, its config, the
manifests, and bad requests refused with nothing written."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from k8s_crds import assert_valid, crd_folder

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.packaging.archiver import build_archive
from service.packaging.export import Batching, archive_to_export, export_archive, export_job
from service.packaging.model_store import ModelStore
from service.records import Job, JobResult, JobState
from service.serving_types import Archive, ExportRequest
from service.settings import Settings
from service.spec import JobSpec


@pytest.fixture(scope="module")
def store(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    settings = Settings(state_dir=tmp_path_factory.mktemp("state"))
    build_archive(serving_checkpoint, settings.model_store, "pets", "1")
    build_archive(serving_checkpoint, settings.model_store, "pets", "2")
    return ModelStore(settings)


@pytest.fixture(scope="module")
def archive(store: ModelStore) -> Archive:
    return store.archive("pets", "2")


def job(state: JobState, archive: Archive) -> Job:
    spec = JobSpec.model_validate(
        {"name": "pets", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
    )
    result = JobResult(archive_path=str(archive.path), archive_sha256=archive.sha256)
    return Job("job-1", spec, state, 1.0, 1.0, result=result)


def request(target: Path, **fields) -> ExportRequest:
    return ExportRequest(job_id="job-1", target=target, **fields)


def properties(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_the_folder_is_kserves_torchserve_layout_with_a_snapshot_that_loads_the_model(
    archive: Archive, tmp_path: Path
):
    target = tmp_path / "out"
    done = export_archive(archive, request(target), Batching(batch_size=4, max_batch_delay_ms=20, workers=2))

    assert done.files == ("config/config.properties", "model-store/pets.mar")
    assert (target / "model-store" / "pets.mar").read_bytes() == archive.path.read_bytes()
    config = properties(target / "config" / "config.properties")
    assert config["inference_address"] == "http://0.0.0.0:8085"
    assert config["management_address"] == "http://127.0.0.1:8081"
    assert (config["metrics_address"], config["metrics_mode"]) == ("http://0.0.0.0:8082", "prometheus")
    assert config["disable_token_authorization"] == "false"
    assert config["model_store"] == "/mnt/models/model-store"
    # the service's own TorchServe settings, so the exported folder serves as fast (bench/serving.py)
    assert (config["number_of_netty_threads"], config["netty_client_threads"]) == ("4", "4")
    assert config["job_queue_size"] == "100"
    snapshot = json.loads(config["model_snapshot"])
    assert snapshot["modelCount"] == 1
    assert snapshot["models"] == {
        "pets": {
            "2": {
                "defaultVersion": True,
                "marName": "pets.mar",
                "minWorkers": 2,
                "maxWorkers": 2,
                "batchSize": 4,
                "maxBatchDelay": 20,
                "responseTimeout": 120,
            }
        }
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_token_auth_is_the_users_choice(archive: Archive, tmp_path: Path):
    export_archive(archive, request(tmp_path / "out", token_auth=False))
    assert (
        properties(tmp_path / "out" / "config" / "config.properties")["disable_token_authorization"] == "true"
    )


def test_kserve_adds_an_inference_service_and_our_runtime(archive: Archive, tmp_path: Path):
    target = tmp_path / "out"
    done = export_archive(
        archive, request(target, kserve=True, storage_uri="pvc://models/pets", max_replicas=6)
    )

    assert "kserve/inferenceservice.yaml" in done.files and "kserve/clusterservingruntime.yaml" in done.files
    isvc = yaml.safe_load((target / "kserve" / "inferenceservice.yaml").read_text())
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["modelFormat"] == {"name": "pytorch"}
    assert predictor["model"]["storageUri"] == "pvc://models/pets"
    assert predictor["model"]["runtime"] == "tuneserve-torchserve"
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"]) == (1, 6, "cpu")
    runtime = yaml.safe_load((target / "kserve" / "clusterservingruntime.yaml").read_text())
    container = runtime["spec"]["containers"][0]
    assert container["args"][-2:] == [
        "--model-store=/mnt/models/model-store",
        "--ts-config=/mnt/models/config/config.properties",
    ]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["ports"][0]["containerPort"] == 8085
    if crd_folder() is not None:  # the files as written, strictly against KServe's CRDs
        assert_valid(isvc)
        assert_valid(runtime)


def test_an_empty_target_folder_is_filled(archive: Archive, tmp_path: Path):
    (tmp_path / "out").mkdir()
    export_archive(archive, request(tmp_path / "out"))
    assert (tmp_path / "out" / "model-store" / "pets.mar").is_file()


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"kserve": True, "storage_uri": "ftp://host/pets"}, InvalidArgument, "unknown scheme 'ftp'"),
        ({"kserve": True}, InvalidArgument, "storage_uri is required"),
        ({"storage_uri": "s3://b/pets"}, InvalidArgument, "only used with kserve"),
        ({"batch_size": 0}, InvalidArgument, "batch_size is 0"),
        ({"min_replicas": 3, "max_replicas": 2}, InvalidArgument, "below min_replicas"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    archive: Archive, tmp_path: Path, fields, error, words
):
    with pytest.raises(error, match=words):
        export_archive(archive, request(tmp_path / "out", **fields))
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_target_is_refused_and_left_as_it_was(archive: Archive, tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(FailedPrecondition, match="exists and is not empty"):
        export_archive(archive, request(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_relative_target_is_refused(archive: Archive):
    with pytest.raises(InvalidArgument, match="not absolute"):
        export_archive(archive, request(Path("out")))


def test_a_failure_midway_leaves_nothing(archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("service.packaging.export.write_manifests", broken)
    with pytest.raises(OSError, match="disk full"):
        export_archive(archive, request(tmp_path / "out", kserve=True, storage_uri="s3://b/pets"))
    assert list(tmp_path.iterdir()) == []


def test_an_archive_without_its_handlers_code_is_refused(archive: Archive, tmp_path: Path):
    old = tmp_path / "pets-v1.mar"
    with zipfile.ZipFile(archive.path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            if not item.filename.startswith(("handlers/", "service/")):
                dst.writestr(item, src.read(item))
    with pytest.raises(FailedPrecondition, match="before archives carried"):
        export_archive(replace(archive, path=old), request(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_jobs_own_archive_is_the_default_and_another_version_can_be_named(
    store: ModelStore, archive: Archive
):
    succeeded = job(JobState.SUCCEEDED, archive)
    assert archive_to_export(succeeded, "", store).version == "2"
    assert archive_to_export(succeeded, "1", store).version == "1"


def test_a_missing_version_is_not_found_naming_the_versions_there(store: ModelStore, archive: Archive):
    with pytest.raises(NotFound, match=r"no version '7'.*1, 2"):
        archive_to_export(job(JobState.SUCCEEDED, archive), "7", store)


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.RUNNING, JobState.CANCELLED])
def test_only_a_succeeded_job_exports(store: ModelStore, archive: Archive, state: JobState):
    with pytest.raises(FailedPrecondition, match=f"is {state.value}.*only a SUCCEEDED job"):
        archive_to_export(job(state, archive), "", store)


def test_batching_comes_from_the_jobs_serving_spec_unless_the_request_says(
    store: ModelStore, archive: Archive, tmp_path: Path
):
    spec = JobSpec.model_validate(
        {
            "name": "pets",
            "model": {"architecture": "resnet18"},
            "data": {"path": "d"},
            "serving": {"batch_size": 16, "max_batch_delay_ms": 0, "workers": 3},
        }
    )
    succeeded = replace(job(JobState.SUCCEEDED, archive), spec=spec)
    export_job(succeeded, request(tmp_path / "a", workers=1), store)
    snapshot = json.loads(properties(tmp_path / "a" / "config" / "config.properties")["model_snapshot"])
    entry = snapshot["models"]["pets"]["2"]
    assert (entry["batchSize"], entry["maxBatchDelay"], entry["minWorkers"], entry["maxWorkers"]) == (
        16,
        0,
        1,
        1,
    )
