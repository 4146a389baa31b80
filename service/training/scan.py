"""Find a job's images: scan an ImageFolder (or a multilabel CSV manifest) under the data root, then split.

Scanning is cheap on purpose: a file counts as an image when its extension is an image one and PIL can
read its header (no decode). Files that fail are *skipped and counted*, never fatal; the reasons are
the SKIP_* constants below. Files that pass the header check but fail to decode are caught later, at
load time (service.training.loaders), and skipped the same way.

Errors (DatasetError, INVALID_ARGUMENT) are for datasets that cannot be used at all: a path outside
the data root, a missing folder, no class folders, too few classes, an empty class folder, no images.

Which class sets a task accepts is its strategy's (service.tasks): multiclass needs 2+ class folders,
binary exactly 2; multilabel reads `data.manifest` instead of folders (image paths relative to the
data root), and a `data.val_path` for it is a second manifest.
"""

from __future__ import annotations

import csv
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from service.errors import DatasetError
from service.spec import DataSpec, Task
from service.tasks import task_for
from service.training.data_root import printable, resolve_under_root

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
SKIP_NOT_IMAGE = "not an image file"
SKIP_BAD_HEADER = "unreadable image header"
SKIP_TOO_LARGE = "image too large"
SKIP_OUTSIDE_ROOT = "outside the data root"
SKIP_MISSING = "file not found"
SKIP_UNDECODABLE = "cannot be decoded"  # found at load time


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int | tuple[int, ...]  # class index; for multilabel, the indices of its labels
    size: tuple[int, int]  # (width, height) from the header


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetInfo:
    """What a scan found: classes in sorted order, usable images, and the files it skipped (with why)."""

    root: Path
    class_names: tuple[str, ...]
    samples: tuple[Sample, ...]
    skipped: tuple[Skipped, ...]

    @property
    def images_per_class(self) -> dict[str, int]:
        counts = Counter(i for s in self.samples for i in _labels(s.target))
        return {name: counts[i] for i, name in enumerate(self.class_names)}


@dataclass(frozen=True)
class Splits:
    class_names: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    skipped: tuple[Skipped, ...]


def skip_summary(skipped: Iterable[Skipped], examples: int = 5) -> dict[str, Any]:
    """Counts by reason plus a few example paths: the data of a WARNING event."""
    skipped = list(skipped)
    return {
        "skipped": len(skipped),
        "reasons": dict(Counter(s.reason for s in skipped)),
        "examples": [f"{printable(s.path)} ({s.reason})" for s in skipped[:examples]],
    }


def scan_dataset(
    path: Path, data_root: Path, *, task: Task = "multiclass", max_image_pixels: int | None = None
) -> DatasetInfo:
    """Scan an ImageFolder (one sub-folder per class) under the data root."""
    folder = resolve_under_root(path, data_root)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"dataset folder {str(path)!r} {what} under the data root {data_root.resolve()}")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(
            f"dataset folder {str(path)!r} has no class folders; put each class's images in its own "
            f"sub-folder, e.g. {path}/cat/1.jpg and {path}/dog/1.jpg"
        )
    _check_class_names(class_dirs, str(path))
    root = data_root.resolve()
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    empty: list[str] = []
    for index, class_dir in enumerate(class_dirs):
        found = 0
        for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            checked = check_image(file, root, max_image_pixels)
            if isinstance(checked, Skipped):
                skipped.append(checked)
            else:
                samples.append(Sample(file, index, checked))
                found += 1
        if not found:
            empty.append(class_dir.name)
    if not samples:
        raise DatasetError(f"dataset folder {str(path)!r} has no usable images{_skips_hint(skipped)}")
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(repr(e) for e in empty)} in {str(path)!r} have no usable images"
            f"{_skips_hint(skipped)}; add images or remove the folder(s)"
        )
    task_for(task).check_class_count([d.name for d in class_dirs], str(path))
    return DatasetInfo(folder, tuple(d.name for d in class_dirs), tuple(samples), tuple(skipped))


def scan_manifest(
    manifest: str | Path, data_root: Path, *, max_image_pixels: int | None = None
) -> DatasetInfo:
    """Scan a multilabel CSV of `path,labels` rows (labels `;`-separated, paths relative to the data root)."""
    file = resolve_under_root(manifest, data_root, "data.manifest")
    if not file.is_file():
        raise DatasetError(f"data.manifest {str(manifest)!r} is not a file under the data root")
    root = data_root.resolve()
    try:
        with open(file, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"data.manifest {str(manifest)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV "
            "with rows `path,labels`"
        ) from None
    if rows and [c.strip().lower() for c in rows[0]] == ["path", "labels"]:
        rows = rows[1:]
    entries: list[tuple[Path, tuple[str, ...]]] = []
    for number, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise DatasetError(
                f"data.manifest {str(manifest)!r} row {number} has {len(row)} columns; each row is "
                '`path,labels` with labels separated by ";" (quote the path if it holds a comma)'
            )
        labels = tuple(sorted({label.strip() for label in row[1].split(";") if label.strip()}))
        entries.append((root / row[0].strip(), labels))
    class_names = tuple(sorted({label for _, labels in entries for label in labels}))
    task_for("multilabel").check_class_count(class_names, str(manifest))
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for image, labels in entries:
        checked = check_image(image, root, max_image_pixels)
        if isinstance(checked, Skipped):
            skipped.append(checked)
        else:
            samples.append(Sample(image, tuple(index[label] for label in labels), checked))
    if not samples:
        raise DatasetError(f"data.manifest {str(manifest)!r} lists no usable images{_skips_hint(skipped)}")
    return DatasetInfo(file.parent, class_names, tuple(samples), tuple(skipped))


def check_image(file: Path, root: Path, max_image_pixels: int | None = None) -> tuple[int, int] | Skipped:
    """(width, height) from the header, or why the file is skipped. Reads the header only, never decodes."""
    if file.name.startswith(".") or file.suffix.lower() not in IMAGE_EXTENSIONS:
        return Skipped(file, SKIP_NOT_IMAGE)
    try:
        if not file.is_file():
            return Skipped(file, SKIP_MISSING)
        if not file.resolve().is_relative_to(root):
            return Skipped(file, SKIP_OUTSIDE_ROOT)  # a symlink that leads out of the data root
    except (OSError, ValueError):  # a manifest row naming a path the OS cannot look up (too long, NUL)
        return Skipped(file, SKIP_MISSING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            with Image.open(file) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        return Skipped(file, SKIP_TOO_LARGE)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # PIL raises all of these
        return Skipped(file, SKIP_BAD_HEADER)
    if max_image_pixels is not None and width * height > max_image_pixels:
        return Skipped(file, SKIP_TOO_LARGE)
    return (width, height)


def load_splits(
    data: DataSpec, task: Task, data_root: Path, *, seed: int, max_image_pixels: int | None = None
) -> Splits:
    """Train and validation samples: the separate val folder/manifest, else a seeded stratified split."""
    if task_for(task).reads_manifest:
        assert data.manifest is not None  # JobSpec requires it for a task that reads a manifest
        info = scan_manifest(data.manifest, data_root, max_image_pixels=max_image_pixels)
        val_info = (
            scan_manifest(data.val_path, data_root, max_image_pixels=max_image_pixels)
            if data.val_path
            else None
        )
    else:
        info = scan_dataset(Path(data.path), data_root, task=task, max_image_pixels=max_image_pixels)
        val_info = (
            scan_dataset(Path(data.val_path), data_root, task=task, max_image_pixels=max_image_pixels)
            if data.val_path
            else None
        )
    if val_info is None:
        train, val = split_stratified(info.samples, data.val_fraction, seed)
        return Splits(info.class_names, train, val, info.skipped)
    return Splits(
        info.class_names, info.samples, _same_classes(info, val_info, task), info.skipped + val_info.skipped
    )


def split_stratified(
    samples: tuple[Sample, ...], val_fraction: float, seed: int
) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Hold out `val_fraction` of each class (multilabel: of each first label), seeded; train keeps one."""
    by_class: dict[tuple[int, ...], list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[_labels(sample.target)[:1]].append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for key in sorted(by_class):
        group = list(by_class[key])
        rng.shuffle(group)
        n_val = min(max(round(len(group) * val_fraction), 1), len(group) - 1)
        val += group[:n_val]
        train += group[n_val:]
    if not val:
        raise DatasetError(
            f"data.val_fraction {val_fraction} of {len(samples)} images leaves no validation image; "
            "add images (at least 2 per class), or give a separate data.val_path"
        )
    order = {s.path: i for i, s in enumerate(samples)}  # keep scan order within each split
    return tuple(sorted(train, key=lambda s: order[s.path])), tuple(sorted(val, key=lambda s: order[s.path]))


def _same_classes(train: DatasetInfo, val: DatasetInfo, task: Task) -> tuple[Sample, ...]:
    """Val samples re-indexed onto the train classes (the task decides which class sets may differ)."""
    task_for(task).check_val_classes(train.class_names, val.class_names)
    remap = {i: train.class_names.index(name) for i, name in enumerate(val.class_names)}
    return tuple(
        Sample(
            s.path,
            tuple(remap[i] for i in s.target) if isinstance(s.target, tuple) else remap[s.target],
            s.size,
        )
        for s in val.samples
    )


def _check_class_names(class_dirs: list[Path], path: str) -> None:
    # a class name becomes a label in events, results and the served model: it must be text
    bad = [printable(d.name) for d in class_dirs if printable(d.name) != d.name]
    if bad:
        raise DatasetError(
            f"class folder {', '.join(repr(b) for b in bad)} in {path!r} has a name that is not UTF-8; "
            "class folder names become the labels: rename it in UTF-8"
        )


def _labels(target: int | tuple[int, ...]) -> tuple[int, ...]:
    return target if isinstance(target, tuple) else (target,)


def _skips_hint(skipped: list[Skipped]) -> str:
    if not skipped:
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(s.reason for s in skipped).items())
    return (
        f" ({len(skipped)} file(s) skipped: {reasons}; images must be {', '.join(sorted(IMAGE_EXTENSIONS))})"
    )
