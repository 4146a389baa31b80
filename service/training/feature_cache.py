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
from service.training.distributed import Group, Ranks
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
    group: Group | None = None,
) -> tuple[Loader | None, list[Skipped]]:
    """A loader of the prefix's outputs over `dataset`, shuffled per (seed, epoch) like the image loader,
    or None when they would take more than `max_bytes`; plus the images that failed to decode.

    `batch_size` is the global batch. Under DDP (`group`) each rank runs the prefix over its shard only,
    then the ranks exchange what they computed, so every rank holds every image's features and takes its
    shard of each epoch's order, as the image loader does: the same batches as without the cache (a
    shard fixed once would change which images meet in a step). The cost: each rank holds the whole
    cache in memory."""
    group = group or Group(Ranks())
    ranks = group.ranks
    features: list[Tensor] = []
    targets: list[Tensor] = []
    skipped: list[Skipped] = []
    used, too_big = 0, False
    for batch in in_order(dataset, batch_size, num_workers, rank=ranks.rank, world_size=ranks.world_size):
        skipped += batch.skipped
        if batch.images.numel() == 0:
            continue
        on_device, _ = device.to_device(batch.images, batch.targets)
        with device.autocast():
            output = split.prefix(on_device)
        used += output.numel() * output.element_size()
        if used * ranks.world_size > max_bytes:  # every rank will hold every shard's features
            too_big = True
            break
        features.append(output)
        targets.append(batch.targets)
    skipped = group.gather(skipped, "gathering the files the frozen-feature pass skipped")
    # a rank with nothing cached (its shard all undecodable) has no shape to exchange: images, then
    if group.any(too_big or not features, "agreeing whether to cache the frozen features"):
        log.info("frozen features would exceed %d bytes, or a shard has none; not caching them", max_bytes)
        return None, skipped
    cached = _whole(group, dataset, torch.cat(features), torch.cat(targets), skipped)
    per_rank = batch_size // ranks.world_size
    loader: Loader = DataLoader(
        cached,  # type: ignore[arg-type]
        batch_size=per_rank,
        # the image loader's sampler and tail rule (service.training.loaders.build_loaders)
        sampler=EpochSampler(
            len(cached), seed, True, rank=ranks.rank, world_size=ranks.world_size, drop_last=True
        ),
        drop_last=drop_last_batch(len(cached) // ranks.world_size, per_rank),
        collate_fn=_collate,
        # its own generator, as the image loader has: without one each pass draws its base seed from
        # the global generator, and the dropout masks seeded from (seed, epoch) would shift
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, skipped


def _whole(
    group: Group, dataset: ImageDataset, features: Tensor, targets: Tensor, skipped: list[Skipped]
) -> FeatureDataset:
    """Every rank's shard of features put back in dataset order, the skipped images left out (as one
    process's in-order pass would leave them)."""
    if not group.ranks.distributed:
        return FeatureDataset(features, targets)
    ranks, lost = group.ranks, {s.path for s in skipped}
    shard = range(ranks.rank, len(dataset), ranks.world_size)
    indices = torch.tensor([i for i in shard if dataset.samples[i].path not in lost], device=features.device)
    all_indices = torch.cat(group.gather_rows(indices, "gathering the frozen features' indices"))
    all_features = torch.cat(group.gather_rows(features, "gathering the frozen features"))
    on_device = targets.to(features.device)  # NCCL gathers only what is on the GPU
    all_targets = torch.cat(group.gather_rows(on_device, "gathering the frozen features' targets")).cpu()
    order = torch.argsort(all_indices)
    return FeatureDataset(all_features[order], all_targets[order])
