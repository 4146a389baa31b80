"""Hostile datasets: each is a clear DatasetError naming the path, or a counted skip (service.training.scan).

What tests/unit/test_data.py already covers (non-images, corrupt headers, the pixel cap, `..` and
absolute paths, a symlinked dataset, an image symlinked in, an empty class, one class, a truncated PNG)
is not repeated; the cases below are the ones it lacks.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from imagefolders import make_image_folder, write_image
from PIL import Image
from reliability import record

from handlers.inference import RequestError
from handlers.inference import decode_image as decode_request_image
from service.errors import DatasetError
from service.training.loaders import decode_image
from service.training.scan import (
    SKIP_BAD_HEADER,
    SKIP_TOO_LARGE,
    scan_dataset,
    scan_manifest,
    skip_summary,
)

pytestmark = pytest.mark.reliability


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=3)
    return tmp_path / "data"


def test_a_decompression_bomb_is_skipped_from_its_header_alone(root: Path) -> None:
    (root / "ds" / "class_0" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    info = scan_dataset(Path("ds"), root, max_image_pixels=40_000_000)
    assert [(s.path.name, s.reason) for s in info.skipped] == [("bomb.png", SKIP_TOO_LARGE)]
    assert info.images_per_class == {"class_0": 3, "class_1": 3}
    record(
        "dataset",
        "a decompression bomb (a 200-byte PNG claiming 100,000 x 100,000 pixels)",
        1,
        "a counted skip ('image too large') from the header, never decoded",
    )


def test_a_bomb_under_pils_own_limit_is_still_skipped_by_ours(root: Path) -> None:
    (root / "ds" / "class_1" / "big.png").write_bytes(png_claiming(8_000, 8_000))  # 64 MP: PIL only warns
    info = scan_dataset(Path("ds"), root, max_image_pixels=40_000_000)
    assert [(s.path.name, s.reason) for s in info.skipped] == [("big.png", SKIP_TOO_LARGE)]


def test_a_bomb_that_reaches_the_loader_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(10_000, 10_000))  # under PIL's own hard limit: ours must catch it
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ValueError, match="10000x10000 is over"):
        decode_image(bomb, 32, "bilinear", max_image_pixels=1_000_000)


def test_a_bomb_sent_to_predict_is_refused_before_decoding() -> None:
    with pytest.raises(RequestError, match=r"refused as a decompression bomb"):
        decode_request_image(png_claiming(100_000, 100_000), max_pixels=40_000_000)
    with pytest.raises(RequestError, match=r"8000x8000 = 64000000 pixels; the limit is 40000000"):
        decode_request_image(png_claiming(8_000, 8_000), max_pixels=40_000_000)
    record(
        "request",
        "Predict/handler: an image over TUNESERVE_MAX_IMAGE_PIXELS and a bomb header",
        2,
        "refused before decoding, with the size and the limit in the message",
    )


@pytest.mark.parametrize(
    "content",
    [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", os.urandom(2048)],
    ids=["empty", "png-magic-only", "gif-magic-only", "random"],
)
def test_an_empty_or_garbage_image_file_is_a_counted_skip(root: Path, content: bytes) -> None:
    (root / "ds" / "class_0" / "junk.jpg").write_bytes(content)
    info = scan_dataset(Path("ds"), root)
    assert [(s.path.name, s.reason) for s in info.skipped] == [("junk.jpg", SKIP_BAD_HEADER)]


def test_a_class_folder_symlinked_out_of_the_root_is_named_as_empty(root: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "secret", classes=1, per_class=2)
    (root / "ds" / "class_9").symlink_to(tmp_path / "secret" / "class_0")
    with pytest.raises(DatasetError, match=r"'class_9' .* no usable images .*2 outside the data root"):
        scan_dataset(Path("ds"), root)
    record(
        "dataset",
        "symlinks leading out of the data root (dataset, class folder, image)",
        3,
        "dataset: INVALID_ARGUMENT 'outside the data root'; class folder: named as empty; "
        "image: counted skip",
    )


def test_a_symlink_loop_in_a_class_folder_neither_hangs_nor_counts(root: Path) -> None:
    (root / "ds" / "class_0" / "loop").symlink_to(root / "ds" / "class_0")
    (root / "ds" / "class_0" / "a.png").symlink_to(root / "ds" / "class_0" / "b.png")
    (root / "ds" / "class_0" / "b.png").symlink_to(root / "ds" / "class_0" / "a.png")
    info = scan_dataset(Path("ds"), root)
    assert info.images_per_class == {"class_0": 3, "class_1": 3}
    record(
        "dataset",
        "a directory symlink loop and a file symlink loop in a class folder",
        2,
        "not followed, not counted; the scan ends",
    )


def test_dot_dot_that_stays_inside_the_root_is_allowed(root: Path) -> None:
    info = scan_dataset(Path("ds/../ds/./"), root)
    assert info.root == (root / "ds").resolve()


@pytest.mark.parametrize("path", ["ds/../../data/../..", "ds/class_0/../../../x"])
def test_dot_dot_that_climbs_out_is_refused_naming_the_path(root: Path, path: str) -> None:
    with pytest.raises(DatasetError, match=rf"data.path '{path}' is outside the data root"):
        scan_dataset(Path(path), root)
    record(
        "dataset",
        f"`..` in data.path ({path!r}, and stays-inside forms)",
        1,
        "outside: INVALID_ARGUMENT naming the path and the root; inside: allowed",
    )


def test_a_symlink_to_an_image_elsewhere_inside_the_root_is_used(root: Path) -> None:
    (root / "ds" / "class_0" / "alias.png").symlink_to(root / "ds" / "class_1" / "0.png")
    info = scan_dataset(Path("ds"), root)
    assert info.images_per_class == {"class_0": 4, "class_1": 3} and info.skipped == ()


@pytest.mark.parametrize("name", ["猫", "café", "emoji 🙂", "\u202eevil", "with space", "-dash", "x" * 200])
def test_odd_unicode_class_and_file_names_are_read_as_they_are(tmp_path: Path, name: str) -> None:
    root = tmp_path / "data"
    write_image(root / "ds" / name / f"{name[:50]}.png", (200, 0, 0))
    write_image(root / "ds" / "plain" / "ü ß.png", (0, 200, 0))
    info = scan_dataset(Path("ds"), root)
    assert info.class_names == tuple(sorted([name, "plain"])) and info.skipped == ()
    record("dataset", f"a class folder and image named {name[:12]!r}", 1, "read as they are, label kept")


def test_a_class_folder_name_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image(root / "ds" / "plain" / "0.png", (0, 200, 0))
    (root / "ds").mkdir(exist_ok=True)
    os.mkdir(os.fsencode(root / "ds") + b"/caf\xe9")  # latin-1 bytes: not a valid UTF-8 name
    write_image(Path(os.fsdecode(os.fsencode(root / "ds") + b"/caf\xe9")) / "0.png", (200, 0, 0))
    with pytest.raises(DatasetError, match=r"class folder 'caf\\\\xe9' .* not UTF-8"):
        scan_dataset(Path("ds"), root)
    record(
        "dataset",
        "a class folder whose name is not UTF-8 (labels must be text)",
        1,
        "INVALID_ARGUMENT naming the folder, escaped",
    )


def test_skip_examples_of_non_utf8_file_names_are_printable_text(root: Path) -> None:
    folder = os.fsencode(root / "ds" / "class_0")
    with open(folder + b"/bad\xff.txt", "wb") as f:
        f.write(b"not an image")
    info = scan_dataset(Path("ds"), root)
    examples = skip_summary(info.skipped)["examples"]
    assert len(examples) == 1 and "bad\\xff.txt" in examples[0]
    examples[0].encode("utf-8")  # what an event or a gRPC message needs; a surrogate would raise here


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"ds/class_0/0.png,caf\xe9\n", "not UTF-8"), (b"\xff\xfe\x00\x01" * 64, "not UTF-8")],
    ids=["latin-1", "binary"],
)
def test_a_manifest_that_is_not_text_is_refused_naming_it(root: Path, content: bytes, fragment: str) -> None:
    (root / "labels.csv").write_bytes(content)
    with pytest.raises(DatasetError, match=rf"data.manifest 'labels.csv' .*{fragment}"):
        scan_manifest("labels.csv", root)
    record(
        "dataset", "a multilabel manifest that is not UTF-8 text", 1, "INVALID_ARGUMENT naming the manifest"
    )


def test_a_manifest_row_with_a_path_the_os_cannot_look_up_is_a_counted_skip(root: Path) -> None:
    (root / "labels.csv").write_text(f"ds/class_0/0.png,a\n{'x' * 5000}.png,b\n")
    info = scan_manifest("labels.csv", root)
    assert len(info.samples) == 1 and [s.reason for s in info.skipped] == ["file not found"]
