"""The promotion gate's images: a fixed sample of a job's validation split, chosen here because only
the training side knows which images the model never trained on.

Up to GATE_SAMPLE_SIZE validation images, stratified by class: round-robin over the classes (multilabel:
over each image's first label, as the split does), so every class appears when the sample has room for
it and a class with few images leaves its turns to the others. Which images of a class come first is
drawn with the job's seed, so the same spec and data give the same sample, in a resumed job and in a
ServeJob long after. Paths are recorded relative to the data root (the service's folders may move).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from service.spec import JobSpec
from service.training.scan import Sample, load_splits

GATE_SAMPLE_SIZE = 32  # enough to catch a broken archive, few enough to gate in seconds on a CPU


def choose_gate_sample(
    val: Sequence[Sample], data_root: Path, seed: int, size: int = GATE_SAMPLE_SIZE
) -> tuple[str, ...]:
    """Up to `size` validation images, round-robin over classes, as POSIX paths relative to the data root."""
    root = data_root.resolve()
    by_class: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for sample in val:
        relative = _relative(sample.path, root)
        if relative is not None:
            target = sample.target if isinstance(sample.target, tuple) else (sample.target,)
            by_class[target[:1]].append(relative)
    # a string seed is hashed with SHA-512 by `random`: stable across processes, and independent of the
    # train/val split, which shuffles with random.Random(seed) itself
    rng = random.Random(f"gate-sample:{seed}")
    queues = []
    for key in sorted(by_class):
        group = sorted(by_class[key])
        rng.shuffle(group)
        queues.append(group)
    chosen: list[str] = []
    for turn in range(max((len(q) for q in queues), default=0)):
        chosen += [queue[turn] for queue in queues if turn < len(queue)]
    return tuple(chosen[:size])


def gate_sample_for(spec: JobSpec, data_root: Path, max_image_pixels: int | None = None) -> tuple[str, ...]:
    """The sample a job of `spec` chose (or would choose), from its data as it is now under the data root.

    Raises service.errors.DatasetError when the data is no longer usable (moved, deleted, emptied).
    """
    splits = load_splits(
        spec.data, spec.task, data_root, seed=spec.training.seed, max_image_pixels=max_image_pixels
    )
    return choose_gate_sample(splits.val, data_root, spec.training.seed)


def _relative(path: Path, root: Path) -> str | None:
    """`path` relative to the data root, or None when it cannot be recorded as text and read back."""
    try:
        relative = path.relative_to(root)
    except ValueError:  # a manifest row with `..` in it: its real place (the scan checked it is inside)
        try:
            relative = path.resolve().relative_to(root)
        except (OSError, ValueError):
            return None
    text = relative.as_posix()
    try:
        os.fsencode(text).decode("utf-8")  # a name that is not UTF-8 cannot travel in JSON or protobuf
    except UnicodeDecodeError:
        return None
    return text
