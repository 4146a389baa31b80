"""The promotion gate's images: the validation sample a job records, and reading it back for the gate."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from imagefolders import job_spec, write_image

from service.packaging.gate_images import images_for_job, read_sample
from service.records import Job, JobResult, JobState
from service.settings import Settings
from service.spec import DataSpec, JobSpec
from service.training.gate_sample import GATE_SAMPLE_SIZE, choose_gate_sample, gate_sample_for
from service.training.scan import Sample, load_splits


def _folder(root: Path, sizes: dict[str, int], name: str = "ds") -> Path:
    for c, (label, count) in enumerate(sizes.items()):
        for j in range(count):
            write_image(root / name / label / f"{j}.png", (40 * c, 200 - 40 * c, 90), size=8, seed=j)
    return root


def _class(path: str) -> str:
    return path.split("/")[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ds/: 4 classes, 30 images each (15 validation each at val_fraction 0.5) plus a class of 3 (2 val)."""
    return _folder(tmp_path_factory.mktemp("data"), {"a": 30, "b": 30, "c": 30, "d": 30, "e": 3})


def _splits(root: Path, seed: int = 0, val_fraction: float = 0.5):  # type: ignore[no-untyped-def]
    return load_splits(DataSpec(path="ds", val_fraction=val_fraction), "multiclass", root, seed=seed)


def test_the_sample_is_32_validation_images_stratified_by_class(root: Path) -> None:
    splits = _splits(root)
    sample = choose_gate_sample(splits.val, root, seed=0)
    assert len(sample) == GATE_SAMPLE_SIZE == 32
    # round-robin: the small class gives both its validation images, the four others share the rest
    assert Counter(_class(p) for p in sample) == {"a": 8, "b": 8, "c": 7, "d": 7, "e": 2}
    val = {str(s.path.relative_to(root.resolve())) for s in splits.val}
    train = {str(s.path.relative_to(root.resolve())) for s in splits.train}
    assert set(sample) <= val and not set(sample) & train and len(set(sample)) == 32
    assert all((root / p).is_file() and not Path(p).is_absolute() for p in sample)


def test_the_sample_is_the_same_for_a_seed_and_different_for_another(root: Path) -> None:
    first = choose_gate_sample(_splits(root, seed=7).val, root, seed=7)
    assert choose_gate_sample(_splits(root, seed=7).val, root, seed=7) == first
    assert choose_gate_sample(_splits(root, seed=8).val, root, seed=8) != first
    # the seed alone changes the choice too, on the very same validation split
    val = _splits(root, seed=7).val
    assert set(choose_gate_sample(val, root, seed=7)) != set(choose_gate_sample(val, root, seed=8))


def test_a_small_validation_split_is_taken_whole_with_every_class(tmp_path: Path) -> None:
    _folder(tmp_path, {"few": 2, "many": 12})
    splits = _splits(tmp_path, val_fraction=0.5)  # 1 + 6 validation images
    sample = choose_gate_sample(splits.val, tmp_path, seed=0)
    assert len(sample) == 7 and Counter(_class(p) for p in sample) == {"few": 1, "many": 6}
    assert _class(sample[0]) != _class(sample[1])  # round-robin: the classes alternate first


def test_a_multilabel_sample_is_stratified_by_first_label(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / f"x{i}.png", (i % 3, 2), (8, 8)) for i in range(60)]
    sample = choose_gate_sample(samples, tmp_path, seed=0, size=9)
    assert sorted(Counter(int(p[1:-4]) % 3 for p in sample).values()) == [3, 3, 3]


def test_a_separate_val_folder_is_where_the_sample_comes_from(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "ds", tmp_path / "ds")
    _folder(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}, name="held-out")
    spec = job_spec(data={"path": "ds", "val_path": "held-out"})
    sample = gate_sample_for(spec, tmp_path)
    assert len(sample) == 10 and all(p.startswith("held-out/") for p in sample)


def test_recomputing_from_the_spec_gives_what_the_job_chose(root: Path) -> None:
    spec = job_spec(data={"path": "ds", "val_fraction": 0.5}, training={"seed": 3})
    assert gate_sample_for(spec, root) == choose_gate_sample(_splits(root, seed=3).val, root, seed=3)


# ----------------------------------------------------------------------- reading it back for the gate


def _job(spec: JobSpec, sample: tuple[str, ...] = ()) -> Job:
    return Job("job-1", spec, JobState.SUCCEEDED, 1.0, 1.0, result=JobResult(gate_sample=sample))


def _settings(root: Path) -> Settings:
    return Settings(state_dir=root / "state", data_root=root)


def test_the_gate_reads_the_recorded_sample_by_its_relative_paths(root: Path) -> None:
    sample = ("ds/a/1.png", "ds/e/2.png")
    images = images_for_job(_job(job_spec(), sample), _settings(root))
    assert [i.name for i in images.images] == list(sample) and images.describe() == "2 validation images"
    assert images.images[0].data == (root / "ds/a/1.png").read_bytes() and not images.warning


def test_reading_the_sample_never_leaves_the_data_root(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"a": 1})
    secret = write_image(tmp_path / "secret.png", (1, 2, 3))
    (root / "link.png").symlink_to(secret)
    images, missing = read_sample(["ds/a/0.png", "../secret.png", str(secret), "link.png", "nope.png"], root)
    assert [i.name for i in images] == ["ds/a/0.png"]
    assert missing == ["../secret.png", str(secret), "link.png", "nope.png"]


def test_a_job_without_a_recorded_sample_gets_it_recomputed_from_its_spec(root: Path) -> None:
    spec = job_spec(data={"path": "ds", "val_fraction": 0.5})
    images = images_for_job(_job(spec), _settings(root))
    assert tuple(i.name for i in images.images) == gate_sample_for(spec, root)
    assert images.describe().startswith("32 validation images (recomputed") and not images.warning


def test_gone_validation_images_mean_synthetic_ones_and_a_warning_that_says_so(tmp_path: Path) -> None:
    spec = job_spec(data={"path": "gone"})
    recorded = images_for_job(_job(spec, ("gone/a/1.png", "gone/b/1.png")), _settings(tmp_path))
    assert recorded.describe() == "4 synthetic images"
    assert "the 2 validation images job job-1 recorded for the gate are gone" in recorded.warning
    assert "'gone/a/1.png'" in recorded.warning and "synthetic" in recorded.warning
    unrecorded = images_for_job(_job(spec), _settings(tmp_path))
    assert unrecorded.describe() == "4 synthetic images"
    assert "recorded no gate sample" in unrecorded.warning and "'gone'" in unrecorded.warning


def test_an_image_too_large_for_torchserves_request_limit_is_left_out(tmp_path: Path) -> None:
    root = _folder(tmp_path, {"a": 2})
    (root / "ds/a/0.png").write_bytes((root / "ds/a/0.png").read_bytes() + bytes(5000))
    images, left_out = read_sample(["ds/a/0.png", "ds/a/1.png"], root, max_bytes=5000)
    assert [i.name for i in images] == ["ds/a/1.png"] and left_out == ["ds/a/0.png"]


def test_some_images_gone_gates_on_the_rest_and_says_how_many(root: Path) -> None:
    images = images_for_job(_job(job_spec(), ("ds/a/1.png", "ds/a/999.png")), _settings(root))
    assert [i.name for i in images.images] == ["ds/a/1.png"]
    assert "1 of the 2 validation images" in images.warning and "'ds/a/999.png'" in images.warning
