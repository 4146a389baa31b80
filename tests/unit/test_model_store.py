"""The model store's one version rule, packaging races, and the checks on an archive handed to deploy."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from service.packaging import model_store
from service.packaging.choose_backend import packager
from service.packaging.mar_files import read_manifest, sha256_of
from service.packaging.model_store import PACKAGE_ATTEMPTS, ModelStore
from service.settings import Settings


def store_with(tmp_path: Path, *names: str) -> ModelStore:
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data")
    settings.model_store.mkdir(parents=True)
    for name in names:
        path = settings.model_store / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not really an archive")
    return ModelStore(settings)


# ------------------------------------------------------------------------------------ version rule


def test_a_new_model_starts_at_version_1(tmp_path: Path) -> None:
    assert store_with(tmp_path, "cats-v4.mar").next_version("pets") == "1"


def test_a_store_folder_that_does_not_exist_yet_means_version_1(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "nowhere", data_root=tmp_path / "data")
    assert ModelStore(settings).next_version("pets") == "1"


def test_the_next_version_is_one_more_than_the_highest_and_a_gap_is_never_filled(tmp_path: Path) -> None:
    assert store_with(tmp_path, "pets-v1.mar", "pets-v3.mar").next_version("pets") == "4"


def test_a_dotted_version_counts_by_its_first_number(tmp_path: Path) -> None:
    assert store_with(tmp_path, "pets-v1.mar", "pets-v2.1.mar").next_version("pets") == "3"


def test_versions_compare_as_numbers_not_as_text(tmp_path: Path) -> None:
    assert store_with(tmp_path, "pets-v9.mar", "pets-v10.mar").next_version("pets") == "11"


def test_foreign_files_and_other_models_do_not_take_a_version(tmp_path: Path) -> None:
    store = store_with(
        tmp_path,
        "pets-v2.mar",
        "petsy-v9.mar",  # another model whose name starts the same
        "pets-v-v8.mar",  # model `pets-v`
        "pets-v7.mar.tmp",  # not an archive name
        "pets-vX.mar",
        "pets-v5",
        "PETS-v6.mar",  # names are case-sensitive, as TorchServe's
        ".staging-abc/pets-v9.mar",  # a packager's private folder, not the store's top level
        "notes.txt",
    )
    assert store.next_version("pets") == "3"
    assert store.next_version("pets-v") == "9"


# ----------------------------------------------------------------------------------------- package


def test_the_packager_needs_neither_torchserve_nor_a_job_store(
    tmp_path: Path, serving_checkpoint: Path
) -> None:
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data", torchserve_enabled=False)
    settings.model_store.mkdir(parents=True)
    (settings.model_store / "pets-v2.mar").write_bytes(b"left by an earlier job")
    archive = packager(settings).package(serving_checkpoint, "pets")  # the worker's one call
    assert (archive.name, archive.version, archive.path.name) == ("pets", "3", "pets-v3.mar")
    assert read_manifest(archive.path) == ("pets", "3") and archive.sha256 == sha256_of(archive.path)


def test_two_packagers_racing_for_one_model_get_two_versions(
    tmp_path: Path, serving_checkpoint: Path
) -> None:
    store = store_with(tmp_path)
    start = threading.Barrier(2)
    archives: list[Any] = []

    def package() -> None:
        start.wait()  # both look at the store before either has written: both pick version 1
        archives.append(store.package(serving_checkpoint, "pets"))

    threads = [threading.Thread(target=package) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.version for a in archives) == ["1", "2"]
    assert sorted(p.name for p in store.folder.iterdir()) == ["pets-v1.mar", "pets-v2.mar"]
    assert {read_manifest(a.path) for a in archives} == {("pets", "1"), ("pets", "2")}


def test_a_version_taken_while_building_is_retried_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_with(tmp_path)
    tried: list[str] = []

    def always_taken(checkpoint: Path, folder: Path, name: str, version: str, **_: Any) -> Any:
        tried.append(version)
        (folder / f"{name}-v{version}.mar").write_bytes(b"another packager's")  # it wins every race
        raise AlreadyExists(f"{name}-v{version}.mar appeared while packaging")

    monkeypatch.setattr(model_store, "build_archive", always_taken)
    with pytest.raises(AlreadyExists, match=f"pets.*{PACKAGE_ATTEMPTS} tries"):
        store.package(tmp_path / "best.pt", "pets")
    assert tried == [str(n) for n in range(1, PACKAGE_ATTEMPTS + 1)]


# ---------------------------------------------------------------------------------------- verified


@pytest.fixture(scope="module")
def packaged(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Any]:
    root = tmp_path_factory.mktemp("verified")
    store = ModelStore(Settings(state_dir=root / "state", data_root=root / "data"))
    return store, store.package(serving_checkpoint, "pets")


def test_a_verified_archive_is_named_by_its_manifest(packaged: tuple[ModelStore, Any]) -> None:
    store, archive = packaged
    assert store.verified(store.folder / "pets-v1.mar", archive.sha256) == archive


def test_an_archive_outside_the_store_is_an_invalid_argument(
    packaged: tuple[ModelStore, Any], tmp_path: Path
):
    store, archive = packaged
    outside = tmp_path / archive.path.name
    outside.write_bytes(archive.path.read_bytes())
    with pytest.raises(InvalidArgument, match="is not in the model store"):
        store.verified(outside, archive.sha256)


def test_a_missing_archive_is_not_found(packaged: tuple[ModelStore, Any]) -> None:
    store, archive = packaged
    with pytest.raises(NotFound, match=r"pets-v7\.mar does not exist"):
        store.verified(store.folder / "pets-v7.mar", archive.sha256)


def test_an_archive_that_changed_since_packaging_is_a_failed_precondition(
    packaged: tuple[ModelStore, Any],
) -> None:
    store, archive = packaged
    with pytest.raises(FailedPrecondition, match="changed since"):
        store.verified(archive.path, "0" * 64)
