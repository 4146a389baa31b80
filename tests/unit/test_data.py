"""Datasets: scanning and its errors, counted skips, splits, the manifest, transforms, seeded loaders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from imagefolders import make_image_folder, one_thread, write_image, write_truncated_png
from PIL import Image

from service.errors import DatasetError
from service.spec import DataSpec
from service.training.architecture import Preprocessing
from service.training.decoding import decode_image, preload
from service.training.loaders import build_loaders
from service.training.scan import (
    SKIP_BAD_HEADER,
    SKIP_NOT_IMAGE,
    SKIP_OUTSIDE_ROOT,
    SKIP_TOO_LARGE,
    SKIP_UNDECODABLE,
    Sample,
    Skipped,
    Splits,
    load_splits,
    scan_dataset,
    scan_manifest,
    split_stratified,
)
from service.training.transforms import make_transforms

PRE = Preprocessing(36, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The data root, tmp_path/data, holding ds/class_{0,1,2}/ with 4 images each."""
    make_image_folder(tmp_path / "data" / "ds", classes=3, per_class=4)
    return tmp_path / "data"


def test_scan_lists_sorted_classes_and_counts(root: Path) -> None:
    info = scan_dataset(Path("ds"), root)
    assert info.class_names == ("class_0", "class_1", "class_2")
    assert info.images_per_class == {"class_0": 4, "class_1": 4, "class_2": 4}
    assert info.skipped == ()


def test_non_images_and_corrupt_headers_are_counted_skips(root: Path) -> None:
    (root / "ds" / "class_0" / "notes.txt").write_text("hello")
    (root / "ds" / "class_1" / "broken.jpg").write_bytes(b"this is no jpeg")
    info = scan_dataset(Path("ds"), root)
    assert sum(info.images_per_class.values()) == 12
    reasons = {s.path.name: s.reason for s in info.skipped}
    assert reasons == {"notes.txt": SKIP_NOT_IMAGE, "broken.jpg": SKIP_BAD_HEADER}


def test_images_over_the_pixel_limit_are_skipped(root: Path) -> None:
    write_image(root / "ds" / "class_0" / "huge.png", (1, 2, 3), size=64)
    info = scan_dataset(Path("ds"), root, max_image_pixels=40 * 40)
    assert [(s.path.name, s.reason) for s in info.skipped] == [("huge.png", SKIP_TOO_LARGE)]


@pytest.mark.parametrize("path", ["../elsewhere", "/etc"])
def test_a_path_outside_the_data_root_is_refused(root: Path, path: str) -> None:
    with pytest.raises(DatasetError, match="outside the data root"):
        scan_dataset(Path(path), root)


def test_a_symlink_out_of_the_data_root_is_refused(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "outside", classes=2, per_class=1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ds").symlink_to(tmp_path / "outside")
    with pytest.raises(DatasetError, match="outside the data root") as refused:
        scan_dataset(Path("ds"), tmp_path / "data")
    assert str(tmp_path / "outside") not in str(refused.value)  # where the link leads is not the caller's


def test_an_image_symlinked_from_outside_is_skipped(root: Path, tmp_path: Path) -> None:
    secret = write_image(tmp_path / "secret.png", (0, 0, 0))
    (root / "ds" / "class_0" / "link.png").symlink_to(secret)
    info = scan_dataset(Path("ds"), root / "ds" / "..")  # a root given with `..` resolves the same
    assert [(s.path.name, s.reason) for s in info.skipped] == [("link.png", SKIP_OUTSIDE_ROOT)]


def test_a_missing_folder_is_named(root: Path) -> None:
    with pytest.raises(DatasetError, match="'nope' does not exist under the data root"):
        scan_dataset(Path("nope"), root)


def test_a_folder_without_class_folders_is_refused(root: Path) -> None:
    write_image(root / "flat" / "a.png", (0, 0, 0))
    with pytest.raises(DatasetError, match="has no class folders"):
        scan_dataset(Path("flat"), root)


def test_a_single_class_is_refused(root: Path) -> None:
    make_image_folder(root / "one", classes=1, per_class=2)
    with pytest.raises(DatasetError, match=r"single class folder \('class_0'\).*at least 2 classes"):
        scan_dataset(Path("one"), root)


def test_binary_needs_exactly_two_classes(root: Path) -> None:
    with pytest.raises(DatasetError, match=r"exactly 2 class folders.*found 3"):
        scan_dataset(Path("ds"), root, task="binary")


def test_an_empty_class_folder_is_named(root: Path) -> None:
    (root / "ds" / "class_9").mkdir()
    (root / "ds" / "class_9" / "readme.md").write_text("nothing here")
    with pytest.raises(DatasetError, match=r"'class_9' .* no usable images .*1 not an image file"):
        scan_dataset(Path("ds"), root)


def test_a_folder_without_images_is_refused(root: Path) -> None:
    for c in ("a", "b"):
        (root / "none" / c).mkdir(parents=True)
        (root / "none" / c / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"has no usable images .*2 file\(s\) skipped"):
        scan_dataset(Path("none"), root)


def test_stratified_split_is_seeded_and_keeps_every_class(root: Path) -> None:
    samples = scan_dataset(Path("ds"), root).samples
    train, val = split_stratified(samples, 0.25, seed=7)
    assert split_stratified(samples, 0.25, seed=7) == (train, val)
    assert split_stratified(samples, 0.25, seed=8) != (train, val)
    assert sorted(s.target for s in val) == [0, 1, 2]  # one of the four images of each class
    assert not {s.path for s in train} & {s.path for s in val}


def test_a_separate_val_folder_must_have_the_same_classes(root: Path) -> None:
    make_image_folder(root / "val", classes=2, per_class=2)
    data = DataSpec(path="ds", val_path="val")
    with pytest.raises(DatasetError, match=r"missing in val \['class_2'\]"):
        load_splits(data, "multiclass", root, seed=0)


def test_a_separate_val_folder_is_used_whole(root: Path) -> None:
    make_image_folder(root / "val", classes=3, per_class=2)
    splits = load_splits(DataSpec(path="ds", val_path="val"), "multiclass", root, seed=0)
    assert (len(splits.train), len(splits.val)) == (12, 6)


def test_multilabel_manifest(root: Path) -> None:
    (root / "labels.csv").write_text(
        "path,labels\nds/class_0/0.png,cat;dog\nds/class_1/0.png,dog\nds/class_2/0.png,\nds/missing.png,cat\n"
    )
    info = scan_manifest("labels.csv", root)
    assert info.class_names == ("cat", "dog")
    assert [s.target for s in info.samples] == [(0, 1), (1,), ()]
    assert [s.reason for s in info.skipped] == ["file not found"]


def test_a_bad_manifest_row_is_named(root: Path) -> None:
    (root / "labels.csv").write_text("ds/class_0/0.png,cat,extra\n")
    with pytest.raises(DatasetError, match="row 1 has 3 columns"):
        scan_manifest("labels.csv", root)


def test_eval_transform_is_center_crop_and_normalise() -> None:
    image = torch.full((3, 36, 48), 255, dtype=torch.uint8)
    train, evaluate = make_transforms(PRE, "light")
    out = evaluate(image)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))
    assert train(image).shape == (3, 32, 32)


def test_image_size_override_keeps_the_resize_ratio() -> None:
    weights = Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), "bilinear")
    assert weights.for_image_size(112).resize_size == 128


def _splits(root: Path) -> Splits:
    return load_splits(DataSpec(path="ds", val_fraction=0.25), "multiclass", root, seed=0)


def _epoch(loader_splits: Splits, epoch: int, **kwargs: object) -> list[torch.Tensor]:
    loaders = build_loaders(
        loader_splits, task="multiclass", preprocessing=PRE, augmentation="standard", batch_size=4, seed=3,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    loaders.set_epoch(epoch)
    return [batch.images for batch in loaders.train]


def test_batches_depend_on_seed_and_epoch_only(root: Path) -> None:
    splits = _splits(root)
    first = _epoch(splits, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(splits, 1), strict=True))
    assert not torch.equal(first[0], _epoch(splits, 2)[0])
    torch.manual_seed(123)  # the global generator does not matter
    uncached = _epoch(splits, 1, cache_max_bytes=0)
    assert all(torch.equal(a, b) for a, b in zip(first, uncached, strict=True))


def test_loader_workers_give_the_same_batches(root: Path) -> None:
    splits = _splits(root)
    with_workers = _epoch(splits, 1, num_workers=1, cache_max_bytes=0)
    assert all(torch.equal(a, b) for a, b in zip(_epoch(splits, 1), with_workers, strict=True))


def test_an_image_that_fails_to_decode_is_skipped_and_counted(root: Path) -> None:
    write_truncated_png(root / "ds" / "class_0" / "zz_truncated.png")
    splits = _splits(root)
    assert any(s.path.name == "zz_truncated.png" for s in splits.train + splits.val)  # the header is fine

    cached = build_loaders(
        splits, task="multiclass", preprocessing=PRE, augmentation="none", batch_size=4, seed=0
    )
    assert cached.cached and [(s.path.name, s.reason) for s in cached.skipped] == [
        ("zz_truncated.png", SKIP_UNDECODABLE)
    ]

    lazy = build_loaders(
        splits,
        task="multiclass",
        preprocessing=PRE,
        augmentation="none",
        batch_size=4,
        seed=0,
        cache_max_bytes=0,
    )
    batches = list(lazy.train) + list(lazy.val)
    skipped: list[Skipped] = [s for b in batches for s in b.skipped]
    assert [s.path.name for s in skipped] == ["zz_truncated.png"]
    assert sum(len(b.images) for b in batches) == 12


def _jpeg_samples(folder: Path, count: int) -> list[Sample]:
    samples = []
    for i in range(count):
        png = write_image(folder / f"{i}.png", (200, 60 + 40 * i, 30), size=40 + 8 * i, seed=i)
        jpeg = png.with_suffix(".jpg")
        with Image.open(png) as image:
            image.save(jpeg, quality=95)
        samples.append(Sample(jpeg, 0, (40 + 8 * i, 40 + 8 * i)))
    return samples


def test_jpegs_decoded_on_a_device_match_pil_decoding(tmp_path: Path) -> None:
    samples = _jpeg_samples(tmp_path, 3)
    # the CPU stands in for CUDA here: the same torchvision.io path, another decoder back-end
    kept, images, lost = preload(samples, PRE, None, decode_device=torch.device("cpu"))
    assert kept == tuple(samples) and not lost
    for sample, image in zip(samples, images, strict=True):
        reference = decode_image(sample.path, PRE.resize_size, PRE.interpolation, None)
        assert image.dtype == torch.uint8 and image.shape == reference.shape
        # two decoders and two resize implementations: a level or two apart, never a different picture
        assert (image.float() - reference.float()).abs().mean() < 3.0


def test_a_corrupt_jpeg_in_a_device_chunk_is_skipped_and_the_others_kept(tmp_path: Path) -> None:
    samples = _jpeg_samples(tmp_path, 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(samples[0].path.read_bytes()[:200])
    samples.append(Sample(broken, 0, (40, 40)))
    kept, images, lost = preload(samples, PRE, None, decode_device=torch.device("cpu"))
    assert kept == tuple(samples[:2]) and len(images) == 2
    assert [(s.path.name, s.reason) for s in lost] == [("broken.jpg", SKIP_UNDECODABLE)]
