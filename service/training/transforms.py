"""The transforms of a decoded, resized uint8 image: crop, augment and normalise, for training and eval.

Validation, the promotion gate and the TorchServe handler all use the eval transform from here, so a
served model sees exactly what validation saw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.transforms import v2

from service.training.architecture import Preprocessing, interpolation_mode

if TYPE_CHECKING:  # only a name here: an archive carries this module, and the spec needs pydantic
    from service.spec import Augmentation

Transform = Callable[[Tensor], Tensor]


def make_transforms(pre: Preprocessing, augmentation: Augmentation) -> tuple[Transform, Transform]:
    """(train, eval) transforms of a resized uint8 image: the weights' own center crop for eval,
    `light` (random resized crop, scale 0.6-1, flip) or `standard` (plus TrivialAugmentWide) for train."""
    interpolation = interpolation_mode(pre.interpolation)
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    evaluate = v2.Compose([v2.CenterCrop(pre.crop_size), *normalize])
    if augmentation == "none":
        return evaluate, evaluate
    augment: list[Callable[..., object]] = [
        v2.RandomResizedCrop(pre.crop_size, scale=(0.6, 1.0), interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augmentation == "standard":
        augment.append(v2.TrivialAugmentWide(interpolation=interpolation))
    return v2.Compose([*augment, *normalize]), evaluate
