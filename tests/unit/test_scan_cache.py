"""Dataset scans kept between CreateJobs: a hit answers as a fresh scan would, a changed folder is seen."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from at_once import at_once
from imagefolders import make_image_folder, write_image

from service.errors import DatasetError
from service.jobs.admission import admit
from service.settings import Settings
from service.spec import parse_spec
from service.training.scan import scan_dataset
from service.training.scan_cache import SCANS, ScanCache


def age(folder: Path, seconds: float = 60.0) -> None:
    """Date `folder` and everything under it `seconds` back: the cache keeps only settled folders."""
    past = time.time() - seconds
    for current, subdirs, files in os.walk(folder):
        for name in [*subdirs, *files]:
            os.utime(Path(current) / name, (past, past))
    os.utime(folder, (past, past))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The data root, tmp_path/data, holding a settled ds/class_{0,1}/ with 3 images each."""
    make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=3)
    age(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def cache() -> ScanCache:
    return ScanCache()


def test_a_second_scan_of_an_unchanged_folder_is_a_hit_equal_to_a_fresh_scan(
    root: Path, cache: ScanCache
) -> None:
    first = cache.scan_dataset(Path("ds"), root)
    second = cache.scan_dataset(Path("ds"), root)
    assert (cache.misses, cache.hits) == (1, 1)
    assert second == first == scan_dataset(Path("ds"), root)


def test_callers_scanning_one_dataset_at_once_walk_it_once(root: Path, cache: ScanCache) -> None:
    # a burst of CreateJobs for one new dataset: the first walks it, the others take what it kept
    results = at_once(8, lambda: cache.scan_dataset(Path("ds"), root))
    assert all(not isinstance(r, Exception) and r == results[0] for r in results), results
    assert (cache.misses, cache.hits) == (1, 7)


def test_an_added_class_folder_is_seen_by_the_next_scan(root: Path, cache: ScanCache) -> None:
    assert cache.scan_dataset(Path("ds"), root).class_names == ("class_0", "class_1")
    write_image(root / "ds" / "class_2" / "0.png", (40, 40, 220))
    assert cache.scan_dataset(Path("ds"), root).class_names == ("class_0", "class_1", "class_2")


def test_a_removed_class_folder_is_seen_by_the_next_scan(root: Path, cache: ScanCache) -> None:
    make_image_folder(root / "ds", classes=3, per_class=3)
    age(root)
    assert len(cache.scan_dataset(Path("ds"), root).class_names) == 3
    shutil.rmtree(root / "ds" / "class_2")
    assert cache.scan_dataset(Path("ds"), root).class_names == ("class_0", "class_1")


def test_an_image_added_to_a_class_folder_is_counted_by_the_next_scan(root: Path, cache: ScanCache) -> None:
    assert len(cache.scan_dataset(Path("ds"), root).samples) == 6
    write_image(root / "ds" / "class_1" / "new.png", (40, 200, 40))
    assert len(cache.scan_dataset(Path("ds"), root).samples) == 7


def test_an_image_added_deep_inside_a_class_folder_is_counted_by_the_next_scan(
    root: Path, cache: ScanCache
) -> None:
    """scan_dataset reads every folder under a class folder: so does the stamp, not just the first level."""
    write_image(root / "ds" / "class_0" / "more" / "0.png", (220, 40, 40))
    age(root)
    assert len(cache.scan_dataset(Path("ds"), root).samples) == 7
    write_image(root / "ds" / "class_0" / "more" / "1.png", (220, 40, 40))
    assert len(cache.scan_dataset(Path("ds"), root).samples) == 8


def test_a_renamed_image_is_seen_by_the_next_scan(root: Path, cache: ScanCache) -> None:
    cache.scan_dataset(Path("ds"), root)
    (root / "ds" / "class_0" / "0.png").rename(root / "ds" / "class_0" / "0.txt")
    assert len(cache.scan_dataset(Path("ds"), root).skipped) == 1


def test_a_folder_changed_just_before_its_scan_is_not_kept(tmp_path: Path, cache: ScanCache) -> None:
    """A second change in the same clock tick would leave the folder's stamp as it was: scan again."""
    make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=3)
    cache.scan_dataset(Path("ds"), tmp_path / "data")
    cache.scan_dataset(Path("ds"), tmp_path / "data")
    assert (cache.misses, cache.hits) == (2, 0)


def test_another_pixel_limit_or_task_is_another_entry(root: Path, cache: ScanCache) -> None:
    cache.scan_dataset(Path("ds"), root)
    with pytest.raises(DatasetError, match="has no usable images"):  # every image is over 16 pixels
        cache.scan_dataset(Path("ds"), root, max_image_pixels=16)
    with pytest.raises(DatasetError, match="task 'binary' needs exactly 2 class folders"):
        make_image_folder(root / "ds", classes=3, per_class=3)
        age(root)
        cache.scan_dataset(Path("ds"), root)  # kept as multiclass
        cache.scan_dataset(Path("ds"), root, task="binary")
    assert cache.hits == 0


def test_a_bad_path_still_gets_the_scans_own_error_every_time(root: Path, cache: ScanCache) -> None:
    for _ in range(2):
        with pytest.raises(DatasetError, match=r"dataset folder 'nope' does not exist"):
            cache.scan_dataset(Path("nope"), root)
        with pytest.raises(DatasetError, match="is outside the data root"):
            cache.scan_dataset(Path("../elsewhere"), root)


def test_a_symlink_swapped_to_leave_the_root_is_refused_after_a_hit(root: Path, cache: ScanCache) -> None:
    outside = root.parent / "outside"
    make_image_folder(outside, classes=2, per_class=3)
    (root / "link").symlink_to(root / "ds")
    age(root)
    cache.scan_dataset(Path("link"), root)
    (root / "link").unlink()
    (root / "link").symlink_to(outside)
    with pytest.raises(DatasetError, match="is outside the data root"):
        cache.scan_dataset(Path("link"), root)


def test_the_oldest_entry_goes_first_when_full(root: Path) -> None:
    cache = ScanCache(max_entries=1)
    make_image_folder(root / "other", classes=2, per_class=3)
    age(root)
    cache.scan_dataset(Path("ds"), root)
    cache.scan_dataset(Path("other"), root)
    cache.scan_dataset(Path("ds"), root)
    assert (cache.misses, cache.hits) == (3, 0)


# ---------------------------------------------------------------------- through admission (CreateJob)


@pytest.fixture
def scans() -> Iterator[ScanCache]:
    SCANS.clear()
    yield SCANS
    SCANS.clear()


def spec(path: str = "ds") -> dict[str, object]:
    return {
        "name": "cache",
        "model": {"architecture": "mobilenet_v3_small", "weights": "none"},
        "data": {"path": path},
        "training": {"epochs": 1, "image_size": 32, "device": "cpu"},
        "serving": {"enabled": False},
    }


def test_admission_answers_the_same_from_the_cache_and_sees_a_new_class_next(
    root: Path, scans: ScanCache
) -> None:
    settings = Settings(state_dir=root.parent / "state", data_root=root, torch_home=root.parent / "th")
    miss = admit(parse_spec(spec()), settings)
    hit = admit(parse_spec(spec()), settings)
    assert scans.hits == 1
    assert hit == miss
    write_image(root / "ds" / "class_2" / "0.png", (40, 40, 220))
    changed = admit(parse_spec(spec()), settings)
    assert changed.class_names == ("class_0", "class_1", "class_2")
    assert changed.num_images == 7
    assert changed.description.layers[-1] != miss.description.layers[-1]  # a 3-way head now


def test_admission_names_the_field_of_a_bad_dataset_path_hit_or_not(root: Path, scans: ScanCache) -> None:
    settings = Settings(state_dir=root.parent / "state", data_root=root, torch_home=root.parent / "th")
    admit(parse_spec(spec()), settings)
    shutil.rmtree(root / "ds" / "class_1")
    for _ in range(2):
        with pytest.raises(DatasetError, match=r"^spec\.data\.path: dataset folder 'ds' has a single class"):
            admit(parse_spec(spec()), settings)
