"""Cache what the frozen prefix computes, when every epoch would compute exactly the same thing.

That holds when the images are the same each epoch (augmentation `none`) and the frozen blocks run
in eval mode (BatchNorm policy `eval`, so no running statistics move and no dropout fires). Then the
prefix runs once over the training set, and each epoch trains the rest of the network on its output,
in the same seeded (seed, epoch) order as images would come.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from service.spec import JobSpec
from service.training.freezing import FrozenSplit
from service.training.loaders import Batch, EpochSampler, ImageDataset, Loader, drop_last_batch, in_order
from service.training.scan import Skipped
from service.training.steps import DevicePlan

log = logging.getLogger(__name__)

FEATURE_CACHE_MAX_BYTES = 1024 * 2**20


def can_cache(spec: JobSpec, split: FrozenSplit | None) -> bool:
    """Whether the prefix's outputs are the same every epoch (see the module docstring)."""
    training = spec.training
    return (
        training.feature_cache
        and split is not None
        and spec.freeze.batchnorm == "eval"
        and training.augmentation == "none"
    )


class FeatureDataset(Dataset[tuple[Tensor, Tensor]]):
    """Cached prefix outputs and their targets, keyed by (epoch, index) like ImageDataset."""

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return self.features[key[1]], self.targets[key[1]]


def _collate(items: list[tuple[Tensor, Tensor]]) -> Batch:
    return Batch(torch.stack([f for f, _ in items]), torch.stack([t for _, t in items]), [])


@torch.no_grad()
def cache_features(
    split: FrozenSplit,
    dataset: ImageDataset,
    device: DevicePlan,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    max_bytes: int = FEATURE_CACHE_MAX_BYTES,
) -> tuple[Loader | None, list[Skipped]]:
    """A loader of the prefix's outputs over `dataset`, shuffled per (seed, epoch) like the image loader,
    or None when they would take more than `max_bytes`; plus the images that failed to decode."""
    features: list[Tensor] = []
    targets: list[Tensor] = []
    skipped: list[Skipped] = []
    used = 0
    for batch in in_order(dataset, batch_size, num_workers):
        skipped += batch.skipped
        if batch.images.numel() == 0:
            continue
        on_device, _ = device.to_device(batch.images, batch.targets)
        with device.autocast():
            output = split.prefix(on_device)
        used += output.numel() * output.element_size()
        if used > max_bytes:
            log.info("frozen features would exceed %d bytes; not caching them", max_bytes)
            return None, skipped
        features.append(output)
        targets.append(batch.targets)
    cached = FeatureDataset(torch.cat(features), torch.cat(targets))
    loader: Loader = DataLoader(
        cached,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=EpochSampler(len(cached), seed, shuffle=True),
        drop_last=drop_last_batch(len(cached), batch_size),
        collate_fn=_collate,
    )
    return loader, skipped
