"""The serving backend as the service wires it: the TorchServe backend is the API's protocol itself."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from service.packaging import choose_backend
from service.packaging.backend import Packager, ServingBackend
from service.packaging.model_store import ModelStore
from service.packaging.torchserve_backend import TorchServeBackend
from service.records import Job, JobResult, JobState
from service.settings import Settings
from service.spec import JobSpec


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


def protocol_methods(protocol: type) -> list[str]:
    return [name for name, member in vars(protocol).items() if inspect.isfunction(member) and name[0] != "_"]


@pytest.mark.parametrize("name", protocol_methods(ServingBackend) + protocol_methods(Packager))
def test_the_torchserve_backend_has_each_protocol_method_with_the_same_parameters(name: str) -> None:
    wanted = inspect.signature(getattr(ServingBackend, name))
    have = inspect.signature(getattr(TorchServeBackend, name))
    assert list(have.parameters.values()) == list(wanted.parameters.values()), name
    assert have.return_annotation == wanted.return_annotation, name


@pytest.fixture
def backend(tmp_path: Path) -> TorchServeBackend:
    """Not started: what fails before TorchServe is asked anything."""
    return TorchServeBackend(Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data"))


def test_deploying_a_job_without_an_archive_is_a_failed_precondition(backend: TorchServeBackend) -> None:
    with pytest.raises(FailedPrecondition, match="job-1 has no archive"):
        backend.deploy_job(job(best_checkpoint="/j/best.pt"))


def test_serving_a_job_without_a_job_store_is_a_failed_precondition(backend: TorchServeBackend) -> None:
    with pytest.raises(FailedPrecondition, match="no job store"):
        backend.serve_job("job-1")


def test_predict_of_a_model_not_served_is_not_found(backend: TorchServeBackend) -> None:
    with pytest.raises(NotFound, match="model 'pets' is not served"):
        backend.predict("pets", None, [b"x"], None)


@pytest.mark.parametrize(("images", "top_k", "fragment"), [([], None, "no images"), ([b"x"], -1, "top_k -1")])
def test_predict_refuses_a_bad_request_naming_it(
    backend: TorchServeBackend, images: list[bytes], top_k: int | None, fragment: str
) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        backend.predict("pets", None, images, top_k)


def test_with_serving_off_the_backend_is_unavailable_and_says_how_to_turn_it_on(tmp_path: Path) -> None:
    off = TorchServeBackend(
        Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data", torchserve_enabled=False)
    )
    off.start()  # does nothing
    assert not off.process.is_running()
    with pytest.raises(Unavailable, match="TUNESERVE_TORCHSERVE_ENABLED=false"):
        off.supervisor.require_running()


def test_the_chosen_backend_and_packager_are_torchserves(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data")
    assert isinstance(choose_backend.serving_backend(settings), TorchServeBackend)
    assert isinstance(choose_backend.packager(settings), ModelStore)


def test_a_named_replica_needs_a_torchserve_folder_of_its_own(tmp_path: Path) -> None:
    from service.app import refuse_a_shared_torchserve_folder

    state = tmp_path / "state"
    shared = Settings(state_dir=state, replica_id="tuneserve-7d9f-abcde")
    with pytest.raises(FailedPrecondition, match="TUNESERVE_TORCHSERVE_FILES_DIR") as refused:
        refuse_a_shared_torchserve_folder(shared)
    assert str(state / "torchserve") in str(refused.value) and "tuneserve-7d9f-abcde" in str(refused.value)
    own = Settings(state_dir=state, replica_id="tuneserve-7d9f-abcde", torchserve_files_dir=tmp_path / "ts")
    refuse_a_shared_torchserve_folder(own)
    assert own.torchserve_dir == tmp_path / "ts" and own.served_registry_file.parent == state / "torchserve"
    spelled_out = Settings(
        state_dir=state, replica_id="r", torchserve_files_dir=state / "x" / ".." / "torchserve"
    )
    with pytest.raises(FailedPrecondition, match="TUNESERVE_TORCHSERVE_FILES_DIR"):
        refuse_a_shared_torchserve_folder(spelled_out)  # the shared folder, named another way
    refuse_a_shared_torchserve_folder(Settings(state_dir=state, replica_id="r", torchserve_enabled=False))
    refuse_a_shared_torchserve_folder(Settings(state_dir=state))  # one unnamed service: its own state folder
