"""Build the network a job fine-tunes: architecture -> pretrained weights -> new head.

Every path (training, describe, the TorchServe handler) builds the architecture the same way, with
no weights, through `build_architecture`; pretrained tensors are loaded afterwards from local files
(service.training.weights). That keeps the module structure identical everywhere, so the fine-tuned
state_dict always fits the model the handler rebuilds from `BuiltModel.model_config`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from service.spec import ModelSpec
from service.training import heads, registry, weights
from service.training.architecture import (
    IMAGENET,
    MODEL_CONFIG_VERSION,
    Preprocessing,
    build_architecture,
    stored_architecture,
    triple,
)

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = weights.DEFAULT


@dataclass(frozen=True)
class WeightsDefaults:
    """The preprocessing of a weights set and the builder arguments it imposes (a ViT's image_size)."""

    preprocessing: Preprocessing
    build_kwargs: dict[str, Any]

    @property
    def build_kwargs_key(self) -> tuple[tuple[str, Any], ...]:
        """build_kwargs as a hashable key (lists become tuples)."""
        return tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.build_kwargs.items())
        )


@dataclass(frozen=True)
class BuiltModel:
    model: nn.Module
    architecture: str
    source: str  # torchvision | timm | builtin
    weights: str  # what was loaded: a torchvision weights name, DEFAULT, file or none
    head_names: tuple[str, ...]
    preprocessing: Preprocessing
    # Everything build_for_inference needs; JSON-serialisable, save it with the checkpoint and the archive.
    model_config: dict[str, Any] = field(repr=False)


def build_model(
    model_spec: ModelSpec, num_classes: int, *, torch_home: Path, weights_root: Path | None = None
) -> BuiltModel:
    """The architecture with its pretrained weights and a fresh `num_classes` head, in train mode.

    A `file` weights choice is read from under `weights_root` (the worker refuses an outside path too).
    """
    resolved = weights.resolve_weights(model_spec, torch_home, weights_root=weights_root)
    build_kwargs = _weights_kwargs(resolved)
    model = build_architecture(resolved.architecture, build_kwargs)
    weights.load_weights(model, resolved, heads.find_head(model))
    head_names = heads.replace_head(model, num_classes)
    preprocessing = _preprocessing(resolved)
    log.info("built %s (weights %s) with %d classes", resolved.architecture, resolved.name, num_classes)
    return BuiltModel(
        model=model.train(),
        architecture=resolved.architecture,
        source=resolved.source,
        weights=resolved.name,
        head_names=head_names,
        preprocessing=preprocessing,
        model_config=_model_config(resolved.architecture, num_classes, build_kwargs, preprocessing),
    )


def rebuild_model(model_config: Mapping[str, Any], num_classes: int, *, weights_name: str) -> BuiltModel:
    """The network a checkpoint's model_config records (its builder arguments included), a fresh
    `num_classes` head, no pretrained weights, in train mode, and the preprocessing it was trained
    with: what a resumed job continues, whatever the spec's names mean today. `weights_name` is what
    the job started from (reports only: the tensors come from the checkpoint next)."""
    architecture = stored_architecture(model_config)
    build_kwargs = dict(model_config.get("build_kwargs") or {})
    model = build_architecture(architecture, build_kwargs)
    head_names = heads.replace_head(model, num_classes)
    preprocessing = Preprocessing.from_model_config(model_config)
    log.info("rebuilt %s from a checkpoint's config with %d classes", architecture, num_classes)
    return BuiltModel(
        model=model.train(),
        architecture=architecture,
        source=registry.source_of(architecture),
        weights=weights_name,
        head_names=head_names,
        preprocessing=preprocessing,
        model_config=_model_config(architecture, num_classes, build_kwargs, preprocessing),
    )


def weights_defaults(
    architecture: str, weights_name: str = DEFAULT_WEIGHTS, torch_home: Path | None = None
) -> WeightsDefaults:
    """What a weights choice implies before any file is read (for describe and admission)."""
    spec = ModelSpec(
        architecture=architecture,
        weights=weights_name,
        weights_file="<not read>" if weights_name == weights.FILE else None,
    )
    home = torch_home or registry.default_torch_home()
    resolved = weights.resolve_weights(spec, home, require_file=False)
    return WeightsDefaults(_preprocessing(resolved), _weights_kwargs(resolved))


def _model_config(
    architecture: str, num_classes: int, build_kwargs: dict[str, Any], preprocessing: Preprocessing
) -> dict[str, Any]:
    return {
        "version": MODEL_CONFIG_VERSION,
        "architecture": architecture,
        "num_classes": num_classes,
        "build_kwargs": build_kwargs,
        "preprocessing": asdict(preprocessing),
    }


def _weights_kwargs(resolved: weights.ResolvedWeights) -> dict[str, Any]:
    # torchvision sizes a ViT's position embedding (and MaxViT's attention grid) from the weights' min_size
    member = resolved.torchvision_weights
    if member is None:
        return {}
    size = list(member.meta["min_size"])
    if resolved.architecture.startswith("vit_"):
        return {"image_size": size[0]}
    if resolved.architecture.startswith("maxvit_"):
        return {"input_size": size}
    return {}


def _preprocessing(resolved: weights.ResolvedWeights) -> Preprocessing:
    if resolved.name in (weights.NONE, weights.FILE):
        return IMAGENET
    if resolved.torchvision_weights is not None:
        transform = resolved.torchvision_weights.transforms()
        return Preprocessing(
            resize_size=int(transform.resize_size[0]),
            crop_size=int(transform.crop_size[0]),
            mean=triple(transform.mean),
            std=triple(transform.std),
            interpolation=str(transform.interpolation.value),
        )
    # the builtin is timm's tf_efficientnet_lite0, whose pretrained config is that of these very weights
    # (TensorFlow's: mean = std = 0.5, bicubic), so timm's own data config applies to both
    cfg = timm.data.resolve_data_config(pretrained_cfg=_timm_pretrained_cfg(resolved.architecture))
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        resize_size=int(crop / cfg["crop_pct"]),  # timm's own rule: floor(size / crop_pct)
        crop_size=crop,
        mean=triple(cfg["mean"]),
        std=triple(cfg["std"]),
        interpolation=str(cfg["interpolation"]),
    )


def _timm_pretrained_cfg(architecture: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(architecture.removeprefix(registry.TIMM_PREFIX))
    return cfg.to_dict() if cfg is not None else {}
