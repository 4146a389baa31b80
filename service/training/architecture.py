"""The network a fine-tuned model is rebuilt into, and how its images are prepared: what serving needs.

An archive carries this module (see service.packaging.handler_runtime) so the TorchServe handler can
rebuild the network where tuneserve is not installed: it imports torch, torchvision and timm only, and
nothing that reads pretrained weights (service.training.builder and weights do that, for training).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from service.errors import FailedPrecondition, InvalidArgument
from service.training import families, heads, registry

# Version 2: `architecture` is canonical, and the builtin is `tf_efficientnet_lite0`. Version 1 named
# the builtin `efficientnet_lite0` and built timm's network of that name (the package's TensorFlow
# weights in a PyTorch-padded network, ImageNet normalisation); such checkpoints still rebuild as such.
MODEL_CONFIG_VERSION = 2
_VERSION_1_NETWORKS = {registry.LITE0_ALIAS: registry.TIMM_PREFIX + registry.LITE0_ALIAS}


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the model: resize the short side, center-crop, normalise."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # a torchvision InterpolationMode value: bilinear | bicubic | nearest

    @classmethod
    def from_model_config(cls, stored: Mapping[str, Any]) -> Preprocessing:
        """What a checkpoint's (or an archive's) model_config says validation and serving do."""
        return cls(
            resize_size=int(stored["resize_size"]),
            crop_size=int(stored["image_size"]),
            mean=triple(stored["mean"]),
            std=triple(stored["std"]),
            interpolation=str(stored["interpolation"]),
        )

    def for_image_size(self, image_size: int | None) -> Preprocessing:
        """The same recipe at another crop size, keeping the resize/crop ratio."""
        if image_size is None or image_size == self.crop_size:
            return self
        resize = round(image_size * self.resize_size / self.crop_size)
        return Preprocessing(resize, image_size, self.mean, self.std, self.interpolation)


IMAGENET = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:  # timm's "random" and the like: bilinear is what most weights were trained with
        return InterpolationMode.BILINEAR


def build_for_inference(model_config: Mapping[str, Any]) -> nn.Module:
    """The architecture with a fresh head and no pretrained weights, in eval mode, for a fine-tuned state.

    model_config (BuiltModel.model_config): `architecture` and `num_classes` (required), `build_kwargs`
    (builder arguments the pretrained weights imposed, e.g. a ViT's image_size; default none),
    `preprocessing` (not used here; the handler's transforms) and `version` (default 1).
    """
    try:
        architecture = stored_architecture(model_config)
        num_classes = int(model_config["num_classes"])
    except KeyError as exc:
        raise InvalidArgument(
            f"model_config lacks {exc.args[0]!r}; it needs architecture and num_classes"
        ) from None
    model = build_architecture(architecture, model_config.get("build_kwargs") or {})
    heads.replace_head(model, num_classes)
    return model.eval()


def stored_architecture(model_config: Mapping[str, Any]) -> str:
    """The architecture a stored model_config builds, read by its version (see MODEL_CONFIG_VERSION)."""
    version = int(model_config.get("version", 1))
    if not 1 <= version <= MODEL_CONFIG_VERSION:
        raise FailedPrecondition(
            f"model_config version {version} is not one this tuneserve reads (1..{MODEL_CONFIG_VERSION}); "
            "it was written by a newer tuneserve: upgrade, or re-train the model here"
        )
    architecture = str(model_config["architecture"]).strip()
    if version == 1 and architecture in _VERSION_1_NETWORKS:
        return _VERSION_1_NETWORKS[architecture]
    return registry.check_architecture(architecture)


def build_architecture(architecture: str, build_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The bare architecture (its original head, random init) on the current default device."""
    kwargs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in (build_kwargs or {}).items()
    }
    source = registry.source_of(architecture)
    if source == "torchvision":
        return torchvision.models.get_model(
            architecture, weights=None, **families.fixed_build_kwargs(architecture), **kwargs
        )
    import timm  # deferred: ~1 s of imports a TorchServe worker serving a torchvision model never needs

    return timm.create_model(architecture.removeprefix(registry.TIMM_PREFIX), pretrained=False, **kwargs)


def triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
