"""Turn samples into batches: decode (once, into memory, for small datasets), transform, batch.

Randomness is a function of (seed, epoch, index) only: the sampler yields (epoch, index) pairs in an
order drawn from (seed, epoch), and each image is augmented under a generator seeded from
(seed, epoch, index). So the batches do not depend on the number of loader workers, and a job resumed
at epoch k sees exactly the batches an uninterrupted run would.

Every image is decoded, converted to RGB and resized (short side to `resize_size`) into a uint8
tensor; the split's transform then crops, flips, augments and normalises it. That first step is the
part worth caching: under CACHE_MAX_BYTES its results are kept in memory and later epochs skip decoding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from service.spec import Augmentation, Task
from service.tasks import task_for
from service.training.architecture import Preprocessing
from service.training.decoding import decode_image, estimate_bytes, preload
from service.training.scan import SKIP_UNDECODABLE, Sample, Skipped, Splits
from service.training.transforms import Transform, make_transforms

log = logging.getLogger(__name__)

CACHE_MAX_BYTES = 512 * 2**20  # decoded, resized uint8 images kept in memory up to this much
PREFETCH_BATCHES = 4
SMALL_DATASET = 2_000  # fewer training images than this: no loader worker processes by default
Item = tuple[Tensor, Tensor] | Skipped  # what ImageDataset gives; the loader turns lists of them into a Batch


def epoch_seed(seed: int, epoch: int, index: int = 0) -> int:
    """A seed that depends on (seed, epoch, index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


Loader = DataLoader[Item]  # yields Batch


class Batch(NamedTuple):
    images: Tensor
    targets: Tensor
    skipped: list[Skipped]  # images of this batch that failed to decode (left out)


class ImageDataset(Dataset[Item]):
    """Items are keyed by (epoch, index); an image that fails to decode yields a Skipped, not an error."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        task: Task,
        num_classes: int,
        preprocessing: Preprocessing,
        transform: Transform,
        seed: int,
        random_transform: bool,
        max_image_pixels: int | None = None,
        images: Sequence[Tensor] | None = None,
    ) -> None:
        self.samples = tuple(samples)
        self.task = task_for(task)
        self.num_classes = num_classes
        self.preprocessing = preprocessing
        self.transform = transform
        self.seed = seed
        self.random_transform = random_transform
        self.max_image_pixels = max_image_pixels
        self.images = images  # decoded up front when the dataset is small

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        epoch, index = key
        sample = self.samples[index]
        if self.images is not None:
            image = self.images[index]
        else:
            try:
                image = decode_image(
                    sample.path,
                    self.preprocessing.resize_size,
                    self.preprocessing.interpolation,
                    self.max_image_pixels,
                )
            except Exception as exc:  # truncated, corrupt, a bomb: skip the image, never kill the worker
                log.warning("skipping %s: %s", sample.path, exc)
                return Skipped(sample.path, SKIP_UNDECODABLE)
        if self.random_transform:
            with torch.random.fork_rng(devices=[]):  # leaves the caller's generator (dropout) untouched
                torch.manual_seed(epoch_seed(self.seed, epoch, index))
                image = self.transform(image)
        else:
            image = self.transform(image)
        return image, self.target(sample)

    def target(self, sample: Sample) -> Tensor:
        return self.task.target(sample.target, self.num_classes)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index): a permutation drawn from (seed, epoch) when shuffling, else in order.

    Under DDP each rank takes its shard of that same order, as DistributedSampler does (`rank`,
    `rank + world_size`, ...), so the ranks' batches together are the batches one process would see with
    the global batch size. With `drop_last` the tail that does not divide by the world size is left out
    (every rank takes the same number of steps); without it the shards may differ by one (validation:
    nothing is counted twice, and no collective runs inside its loop).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.used = size - size % world_size if drop_last else size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order: list[int] = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return iter([(self.epoch, i) for i in order[self.rank : self.used : self.world_size]])


def collate(items: list[Item]) -> Batch:
    """Stack the decoded images; list the ones that failed. A batch may come out empty."""
    good = [item for item in items if not isinstance(item, Skipped)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), skipped)


def seed_worker(worker_id: int) -> None:
    """numpy and random in a loader worker follow the worker's torch seed (itself from the loader's)."""
    import random

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


@dataclass(frozen=True)
class Loaders:
    train: Loader
    val: Loader
    train_dataset: ImageDataset
    val_dataset: ImageDataset
    cached: bool
    num_workers: int
    skipped: tuple[Skipped, ...]  # found while decoding up front

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self.train, epoch)


def set_epoch(loader: Loader, epoch: int) -> None:
    """Make the loader's next pass epoch `epoch` (its order and augmentation)."""
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler)
    sampler.set_epoch(epoch)


def build_loaders(
    splits: Splits,
    *,
    task: Task,
    preprocessing: Preprocessing,
    augmentation: Augmentation,
    batch_size: int,
    seed: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
    max_image_pixels: int | None = None,
    cache_max_bytes: int | None = None,
    decode_device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Seeded train and val loaders; small datasets are decoded once, here, and kept in memory (their
    JPEGs on `decode_device` when given: the GPU's decoder is far faster than PIL on a few cores).

    `batch_size` is the global batch: under DDP (`world_size` > 1) each rank loads batch_size /
    world_size images of its shard (EpochSampler)."""
    per_rank = batch_size // world_size
    train_samples, val_samples = splits.train, splits.val
    train_images = val_images = None
    skipped: list[Skipped] = []
    limit = CACHE_MAX_BYTES if cache_max_bytes is None else cache_max_bytes  # read now: tests lower it
    cached = estimate_bytes(train_samples + val_samples, preprocessing.resize_size) <= limit
    if cached:
        train_samples, train_images, lost_train = preload(
            train_samples, preprocessing, max_image_pixels, decode_device
        )
        val_samples, val_images, lost_val = preload(
            val_samples, preprocessing, max_image_pixels, decode_device
        )
        skipped = lost_train + lost_val
    train_transform, eval_transform = make_transforms(preprocessing, augmentation)
    num_classes = len(splits.class_names)
    train_ds = ImageDataset(
        train_samples, task=task, num_classes=num_classes, preprocessing=preprocessing,
        transform=train_transform, seed=seed, random_transform=augmentation != "none",
        max_image_pixels=max_image_pixels, images=train_images,
    )  # fmt: skip
    val_ds = ImageDataset(
        val_samples, task=task, num_classes=num_classes, preprocessing=preprocessing,
        transform=eval_transform, seed=seed, random_transform=False,
        max_image_pixels=max_image_pixels, images=val_images,
    )  # fmt: skip
    workers = resolve_num_workers(num_workers, len(train_ds), cached)

    def loader(dataset: ImageDataset, shuffle: bool, drop_last: bool) -> Loader:
        sharded = world_size > 1 and shuffle  # training: equal shards, the tail left out
        sampler = EpochSampler(
            len(dataset), seed, shuffle, rank=rank, world_size=world_size, drop_last=sharded
        )
        return DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=workers > 0,
            # batches queued ahead of the training step, per worker (torch's default is 2)
            prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        )

    drop_last = drop_last_batch(len(train_ds) // world_size, per_rank)
    train, val = loader(train_ds, shuffle=True, drop_last=drop_last), loader(val_ds, False, False)
    return Loaders(train, val, train_ds, val_ds, cached, workers, tuple(skipped))


def in_order(
    dataset: ImageDataset, batch_size: int, num_workers: int = 0, *, rank: int = 0, world_size: int = 1
) -> Loader:
    """The dataset once through in index order (as epoch 0 with no shuffling); under DDP this rank's
    shard of it (indices rank, rank + world_size, ...)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), 0, shuffle=False, rank=rank, world_size=world_size),
        num_workers=num_workers,
        collate_fn=collate,
    )


def drop_last_batch(size: int, batch_size: int) -> bool:
    """A last batch of one image breaks BatchNorm in train mode: drop it, and only it."""
    return size > batch_size and size % batch_size == 1


def resolve_num_workers(requested: int | None, train_images: int, cached: bool) -> int:
    if requested is not None:
        return requested
    if cached or train_images < SMALL_DATASET:
        return 0  # worker start-up costs more than it saves
    return min(4, max(1, (os.cpu_count() or 1) - 1))
