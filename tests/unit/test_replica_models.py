"""Which versions a serving replica registers (service.packaging.replica_models), on real folders.

The archives are zip files with only TorchServe's MAR-INF/MANIFEST.json: that is all the choice reads
(serving them is tests/integration/test_serving_only.py's part).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.errors import FailedPrecondition
from service.packaging.mar_files import sha256_of
from service.packaging.replica_models import choose_models, write_registry
from service.packaging.served_registry import ServedRegistry, ServedVersion

REPO = Path(__file__).resolve().parents[2]


def fake_mar(path: Path, name: str, version: str) -> Path:
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr(
            "MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": name, "modelVersion": version}})
        )
    return path


def served(version: str, archive: Path, batch_size: int = 4) -> ServedVersion:
    """The control plane's record of serving `archive` (its SHA-256 as packaged; "0"s when it is gone)."""
    sha256 = sha256_of(archive) if archive.exists() else "0" * 64
    return ServedVersion(
        version=version, job_id=f"job-{version}", archive=archive.name, sha256=sha256, checkpoint="best.pt",
        batch_size=batch_size, max_batch_delay_ms=7, workers=2, top_k=3, served_at=0.0,
    )  # fmt: skip


def test_without_a_control_plane_registry_every_archive_is_served_and_the_highest_is_default(tmp_path: Path):
    store = tmp_path / "model-store"
    store.mkdir()
    fake_mar(store / "pets-v2.mar", "pets", "2")
    fake_mar(store / "pets-v10.mar", "pets", "10")
    fake_mar(store / "digits.mar", "digits", "3")  # an exported folder names it <name>.mar
    (store / "notes.txt").write_text("not an archive")
    (store / "broken.mar").write_bytes(b"not a zip")
    with zipfile.ZipFile(store / "bare.mar", "w") as bare:  # a zip, but no MAR-INF/MANIFEST.json
        bare.writestr("model.pt", b"")
    fake_mar(store / "odd.mar", "pets", "v1")  # not dotted numbers: TorchServe would refuse it
    models = choose_models(store)
    assert {e.name: (e.ordered_versions(), e.default) for e in models.entries} == {
        "digits": (["3"], "3"),
        "pets": (["2", "10"], "10"),
    }
    assert models.entries[1].versions["10"].archive == "pets-v10.mar"
    assert "every archive" in models.source


def test_with_the_control_plane_registry_only_its_served_versions_with_its_batching_and_default(
    tmp_path: Path,
):
    store = tmp_path / "model_store"
    store.mkdir()
    for version in ("1", "2", "3"):
        fake_mar(store / f"pets-v{version}.mar", "pets", version)
    registry = ServedRegistry(tmp_path / "torchserve" / "served_models.json")
    registry.add("pets", served("1", store / "pets-v1.mar", batch_size=16), make_default=True)
    registry.add("pets", served("2", store / "pets-v2.mar"), make_default=False)  # rolled back; 3 refused
    (entry,) = choose_models(store).entries
    assert (entry.ordered_versions(), entry.default) == (["1", "2"], "1")
    assert entry.versions["1"].batch_size == 16


def test_a_served_version_whose_archive_is_gone_is_left_out_and_the_default_moves(tmp_path: Path):
    store = tmp_path / "model_store"
    store.mkdir()
    fake_mar(store / "pets-v1.mar", "pets", "1")
    registry = ServedRegistry(tmp_path / "torchserve" / "served_models.json")
    registry.add("pets", served("1", store / "pets-v1.mar"), make_default=False)
    registry.add("pets", served("2", store / "pets-v2.mar"), make_default=True)
    (entry,) = choose_models(store).entries
    assert (entry.ordered_versions(), entry.default) == (["1"], "1")


def test_a_served_version_whose_archive_changed_since_is_left_out(tmp_path: Path):
    store = tmp_path / "model_store"
    store.mkdir()
    registry = ServedRegistry(tmp_path / "torchserve" / "served_models.json")
    for version in ("1", "2"):
        path = fake_mar(store / f"pets-v{version}.mar", "pets", version)
        registry.add("pets", served(version, path), make_default=True)
    fake_mar(store / "pets-v2.mar", "pets", "2.0")  # replaced behind the control plane's back
    (entry,) = choose_models(store).entries
    assert (entry.ordered_versions(), entry.default) == (["1"], "1")


def test_a_missing_store_is_refused_naming_the_setting(tmp_path: Path):
    with pytest.raises(FailedPrecondition, match="TUNESERVE_MODEL_STORE_DIR"):
        choose_models(tmp_path / "nowhere")


def test_the_replicas_registry_is_replaced_not_merged(tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    fake_mar(store / "pets-v1.mar", "pets", "1")
    path = tmp_path / "replica" / "replica_models.json"
    stale = ServedRegistry(path)
    stale.add("old", served("9", store / "old-v9.mar"), make_default=True)
    written = write_registry(choose_models(store), path)
    assert [e.name for e in written.entries()] == ["pets"]
    assert [e.name for e in ServedRegistry(path).entries()] == ["pets"]  # what a restart reads back


def test_a_replica_never_imports_torch(tmp_path: Path):
    """The replica's process supervises TorchServe; its workers load torch, it must not (seconds of
    start-up and hundreds of MB per replica)."""
    probe = "import sys, service.packaging.serving_only, service.cli.main; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.strip() == "False"
