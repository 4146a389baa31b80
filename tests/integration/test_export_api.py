"""ExportModel over a real gRPC server on loopback: a trained job exports; bad requests get their status.

The service's serving backend is TorchServe's, not started: exporting reads the job store and the model
store only. The folder itself is tested in tests/unit/test_export.py and served for real in
test_export_serving.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cli_harness import assert_error_line, cli_for
from harness import (
    FINAL,
    channel_to,
    make_image_folder,
    make_settings,
    running_service,
    spec,
    stub,
    wait_state,
)

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service
from service.jobs.store import JobStore
from service.packaging.torchserve_backend import TorchServeBackend

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = make_settings(tmp_path_factory.mktemp("export"))
    make_image_folder(settings.data_root / "ds")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    backend = TorchServeBackend(settings, JobStore(settings.jobs_db))  # never started: no TorchServe
    with running_service(settings, backend) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[pb_grpc.FineTuningStub]:
    with channel_to(service) as channel:
        yield stub(channel)


@pytest.fixture(scope="module")
def trained(client: pb_grpc.FineTuningStub) -> pb.Job:
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("pets", serving={"batch_size": 4})))
    done = wait_state(client, job.id, FINAL, timeout=240)
    assert done.state == pb.SUCCEEDED, done.error
    return done


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_a_trained_job_exports_the_kserve_layout(
    client: pb_grpc.FineTuningStub, trained: pb.Job, tmp_path: Path
):
    request = pb.ExportModelRequest(
        job_id=trained.id, target_dir=str(tmp_path / "out"), kserve=True, storage_uri="pvc://models/pets"
    )
    done = client.ExportModel(request)
    assert (done.model, done.version, done.path) == ("pets", "1", str(tmp_path / "out"))
    assert list(done.files) == [
        "config/config.properties",
        "kserve/clusterservingruntime.yaml",
        "kserve/inferenceservice.yaml",
        "model-store/pets.mar",
    ]
    config = (tmp_path / "out" / "config" / "config.properties").read_text()
    snapshot = json.loads(
        next(line for line in config.splitlines() if line.startswith("model_snapshot="))[15:]
    )
    assert snapshot["models"]["pets"]["1"]["batchSize"] == 4  # the job's serving spec


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"version": "9"}, grpc.StatusCode.NOT_FOUND, "no version '9'"),
        ({"kserve": True, "storage_uri": "ftp://x/pets"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown scheme"),
        ({"auth": "basic"}, grpc.StatusCode.INVALID_ARGUMENT, "auth 'basic' is unknown"),
        ({"workers": 0}, grpc.StatusCode.INVALID_ARGUMENT, "workers is 0"),
    ],
)
def test_bad_requests_get_their_status_and_write_nothing(
    client: pb_grpc.FineTuningStub, trained: pb.Job, tmp_path: Path, fields, code, words
):
    request = pb.ExportModelRequest(job_id=trained.id, target_dir=str(tmp_path / "out"), **fields)
    status, details = code_of(lambda: client.ExportModel(request))
    assert status == code and words in details
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_target_is_a_failed_precondition(
    client: pb_grpc.FineTuningStub, trained: pb.Job, tmp_path: Path
):
    (tmp_path / "keep.txt").write_text("mine")
    request = pb.ExportModelRequest(job_id=trained.id, target_dir=str(tmp_path))
    status, details = code_of(lambda: client.ExportModel(request))
    assert status == grpc.StatusCode.FAILED_PRECONDITION and "not empty" in details
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_unknown_job_is_not_found(client: pb_grpc.FineTuningStub, tmp_path: Path):
    request = pb.ExportModelRequest(job_id="job-nope", target_dir=str(tmp_path / "out"))
    assert code_of(lambda: client.ExportModel(request))[0] == grpc.StatusCode.NOT_FOUND


def test_an_unfinished_job_is_a_failed_precondition(client: pb_grpc.FineTuningStub, tmp_path: Path):
    # (a FAILED job is refused the same way: tests/unit/test_export.py)
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("long", training={"epochs": 500})))
    client.CancelJob(pb.CancelJobRequest(job_id=job.id))
    done = wait_state(client, job.id, FINAL, timeout=120)
    request = pb.ExportModelRequest(job_id=done.id, target_dir=str(tmp_path / "out"))
    status, details = code_of(lambda: client.ExportModel(request))
    assert status == grpc.StatusCode.FAILED_PRECONDITION and "only a SUCCEEDED job" in details, details
    assert list(tmp_path.iterdir()) == []


def test_the_cli_exports_and_lists_the_files(service: Service, trained: pb.Job, tmp_path: Path):
    cli = cli_for(service, "")
    args = ["export", trained.id, "--to", str(tmp_path / "out"), "--kserve", "--storage-uri", "gs://b/pets"]
    result = cli(*args, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert f"exported pets version 1 to {tmp_path / 'out'}" in result.stdout
    assert "kserve/inferenceservice.yaml" in result.stdout
    assert '"minWorkers":2' in (tmp_path / "out" / "config" / "config.properties").read_text()


def test_the_cli_names_a_bad_storage_uri_in_one_line(service: Service, trained: pb.Job, tmp_path: Path):
    cli = cli_for(service, "")
    result = cli(
        "export", trained.id, "--to", str(tmp_path / "out"), "--kserve", "--storage-uri", "ftp://x/y"
    )
    assert_error_line(result, 2, "INVALID_ARGUMENT", "ftp://x/y", "unknown scheme")
