"""Owners on the serving side, against a real service and its real TorchServe: a model served from
alice's job is listed to alice and admins only; bob cannot serve or export alice's job (NOT_FOUND, as for
a job that does not exist) and may not change what a model name serves (admin only); everyone with a
token may predict."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import make_image_folder, spec, wait_state
from reliability import record
from torchserve_service import running_torchserve_service

from service.access.tokens_file import token_sha256
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.reliability,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(900),
]

Code = grpc.StatusCode
TOKENS = {"alice": "tok-alice-s", "bob": "tok-bob-s", "root": "tok-root-s", "reader": "tok-reader-s"}
ROLES = {"alice": "submit", "bob": "submit", "root": "admin", "reader": "read"}


def meta(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("auth-serving")
    tokens = root / "tokens.json"
    clients = [{"name": n, "token_sha256": token_sha256(t), "roles": [ROLES[n]]} for n, t in TOKENS.items()]
    tokens.write_text(json.dumps({"clients": clients}))
    make_image_folder(root / "data" / "ds")
    with running_torchserve_service(root, auth_tokens_file=tokens) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def served_job(channel: grpc.Channel) -> pb.Job:
    """alice's tiny job, trained for real, then served by alice as version 1 of `alices`."""
    stub = pb_grpc.FineTuningStub(channel)
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec("alices")), metadata=meta("alice"))
    final = wait_state(_Authed(stub, meta("alice")), job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), 600)
    assert final.state == pb.SUCCEEDED, final.error
    stub.ServeJob(pb.ServeJobRequest(job_id=job.id), metadata=meta("alice"), timeout=600)
    return final


class _Authed:
    """harness.wait_state polls GetJob without metadata: this stub adds the caller's."""

    def __init__(self, stub: pb_grpc.FineTuningStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub, self.metadata = stub, metadata

    def GetJob(self, request: pb.GetJobRequest) -> pb.Job:
        return self.stub.GetJob(request, metadata=self.metadata, timeout=30)


def served_names(channel: grpc.Channel, who: str) -> set[str]:
    answer = pb_grpc.FineTuningStub(channel).ListServedModels(
        pb.ListServedModelsRequest(), metadata=meta(who), timeout=30
    )
    return {model.name for model in answer.models}


def code_of(call: object, request: object, who: str) -> tuple[Code, str]:
    try:
        call(request, metadata=meta(who), timeout=120)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return Code.OK, ""


def test_a_served_model_is_listed_to_its_owner_and_admins_only(
    channel: grpc.Channel, served_job: pb.Job
) -> None:
    assert "alices" in served_names(channel, "alice")
    assert "alices" in served_names(channel, "root")
    assert "alices" not in served_names(channel, "bob")
    assert "alices" not in served_names(channel, "reader")
    record(
        "auth",
        "ListServedModels of a model served from alice's job: by alice, an admin, bob, a reader",
        4,
        "listed to alice and the admin; not to bob or the reader",
    )


def test_another_client_cannot_serve_or_export_a_job_not_theirs(
    channel: grpc.Channel, served_job: pb.Job, tmp_path: Path
) -> None:
    stub = pb_grpc.FineTuningStub(channel)
    ghost = "job-000000000000"
    for request, ghost_request in (
        (pb.ServeJobRequest(job_id=served_job.id), pb.ServeJobRequest(job_id=ghost)),
        (
            pb.ExportModelRequest(job_id=served_job.id, target_dir=str(tmp_path / "e1")),
            pb.ExportModelRequest(job_id=ghost, target_dir=str(tmp_path / "e2")),
        ),
    ):
        call = stub.ServeJob if isinstance(request, pb.ServeJobRequest) else stub.ExportModel
        theirs, nobodys = code_of(call, request, "bob"), code_of(call, ghost_request, "bob")
        assert theirs[0] == nobodys[0] == Code.NOT_FOUND
        assert theirs[1].replace(served_job.id, ghost) == nobodys[1]
    assert not (tmp_path / "e1").exists()
    own = pb.ExportModelRequest(job_id=served_job.id, target_dir=str(tmp_path / "e3"))
    assert code_of(stub.ExportModel, own, "alice")[0] == Code.OK
    record(
        "auth",
        "ServeJob and ExportModel of alice's job by bob (TorchServe running)",
        2,
        "NOT_FOUND in the words of a job that does not exist; nothing written; alice's own export works",
    )


def test_only_an_admin_changes_what_a_model_name_serves(channel: grpc.Channel, served_job: pb.Job) -> None:
    stub = pb_grpc.FineTuningStub(channel)
    request = pb.SetDefaultVersionRequest(name="alices", version="1")
    assert code_of(stub.SetDefaultVersion, request, "alice")[0] == Code.PERMISSION_DENIED
    assert code_of(stub.SetDefaultVersion, request, "root")[0] == Code.OK
    record(
        "auth",
        "SetDefaultVersion by the model's owner (submit) and by an admin",
        2,
        "PERMISSION_DENIED for the submit client; the admin's call works",
    )
