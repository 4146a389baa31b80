"""The model family table: one row per kind of network, saying how it is built, where its head is and
how it is swapped, and whether its frozen prefix splits off for the feature cache.

A row is found from a built model (`family_of`), by its exact class: a subclass may override forward,
so it gets the generic row (heads searched by name, no split) until it has its own. timm models (the
builtin Lite0 is timm's tf_efficientnet_lite0) swap their head through timm's one contract,
`reset_classifier`. Adding a family is adding a row here; service.training.heads, freezing and builder
read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

Op = Callable[[torch.Tensor], torch.Tensor]
# What a family's forward() does, step by step: a top-level child's name, or the functional op between
# children. A split is exact only if this is exactly its forward.
Program = tuple[str | Op, ...]


@dataclass(frozen=True)
class Family:
    """One row of the table (see the module docstring)."""

    name: str
    matches: Callable[[nn.Module], bool]
    # "attribute": the head is the first of `heads` the model has (a Linear, or the last Linear, else
    # the last 1x1 Conv2d, of a Sequential), replaced by a fresh layer; "reset_classifier": timm's contract
    swap: Literal["attribute", "reset_classifier"] = "attribute"
    heads: tuple[str, ...] = ()
    aux_heads: tuple[str, ...] = ()  # auxiliary classifiers, replaced too when the model has them
    # the forward as a chain of blocks (None: no split); a function when it depends on the instance
    program: Program | Callable[[nn.Module], Program | None] | None = None
    # builder arguments fixed whatever the weights, by torchvision architecture name
    build_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def forward_program(self, model: nn.Module) -> Program | None:
        return self.program(model) if callable(self.program) else self.program

    @property
    def splits(self) -> bool:
        """Whether the frozen prefix can run apart (for some instances, when `program` is a function)."""
        return self.program is not None


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean([2, 3])


def _pool_flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


def _relu_pool_flatten(x: torch.Tensor) -> torch.Tensor:
    return _pool_flatten(F.relu(x))  # DenseNet's relu is in place; this one is not, same values


def _timm_efficientnet_program(model: nn.Module) -> Program | None:
    """timm's EfficientNet.forward (timm 1.0): forward_features, then forward_head, as a chain."""
    if getattr(model, "grad_checkpointing", False):  # then blocks run through checkpoint_seq
        return None
    drop_rate = float(getattr(model, "drop_rate", 0.0))

    def dropout(x: torch.Tensor) -> torch.Tensor:  # forward_head's functional dropout, as timm calls it
        return F.dropout(x, p=drop_rate, training=model.training)

    head: Program = (dropout, "classifier") if drop_rate > 0 else ("classifier",)
    return ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", *head)


def _is(cls: type[nn.Module]) -> Callable[[nn.Module], bool]:
    return lambda model: type(model) is cls


def _is_timm_efficientnet(model: nn.Module) -> bool:
    cls = type(model)
    return (cls.__module__, cls.__name__) == ("timm.models.efficientnet", "EfficientNet")


def _has_timm_contract(model: nn.Module) -> bool:
    return callable(getattr(model, "reset_classifier", None)) and callable(
        getattr(model, "get_classifier", None)
    )


# GoogLeNet / Inception v3: no auxiliary classifiers, so every model returns plain logits in train mode
# too; transform_input re-normalises ImageNet-normalised input the way the original Google weights
# expect; init_weights silences torchvision's FutureWarning. Their forward (transform_input, branches)
# is not a chain of blocks, nor is ViT's (class token, reshapes): no split.
_GOOGLE_KWARGS = {"aux_logits": False, "transform_input": True, "init_weights": True}

FAMILIES: tuple[Family, ...] = (
    Family(
        "resnet",
        _is(tvm.ResNet),
        heads=("fc",),
        program=(
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1",
            "layer2",
            "layer3",
            "layer4",
            "avgpool",
            _flatten,
            "fc",
        ),
    ),
    Family(
        "regnet", _is(tvm.RegNet), heads=("fc",), program=("stem", "trunk_output", "avgpool", _flatten, "fc")
    ),
    Family(
        "shufflenet",
        _is(tvm.ShuffleNetV2),
        heads=("fc",),
        program=("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", _spatial_mean, "fc"),
    ),
    Family(
        "googlenet",
        _is(tvm.GoogLeNet),
        heads=("fc",),
        aux_heads=("aux1.fc2", "aux2.fc2"),
        build_kwargs={"googlenet": _GOOGLE_KWARGS},
    ),
    Family(
        "inception",
        _is(tvm.Inception3),
        heads=("fc",),
        aux_heads=("AuxLogits.fc",),
        build_kwargs={"inception_v3": _GOOGLE_KWARGS},
    ),
    Family("vit", _is(tvm.VisionTransformer), heads=("heads.head",)),
    Family(
        "swin",
        _is(tvm.SwinTransformer),
        heads=("head",),
        program=("features", "norm", "permute", "avgpool", "flatten", "head"),
    ),
    Family(
        "densenet",
        _is(tvm.DenseNet),
        heads=("classifier",),
        program=("features", _relu_pool_flatten, "classifier"),
    ),
    Family(
        "alexnet",
        _is(tvm.AlexNet),
        heads=("classifier",),
        program=("features", "avgpool", _flatten, "classifier"),
    ),
    Family(
        "vgg", _is(tvm.VGG), heads=("classifier",), program=("features", "avgpool", _flatten, "classifier")
    ),
    Family(
        "mobilenet_v2",
        _is(tvm.MobileNetV2),
        heads=("classifier",),
        program=("features", _pool_flatten, "classifier"),
    ),
    Family(
        "mobilenet_v3",
        _is(tvm.MobileNetV3),
        heads=("classifier",),
        program=("features", "avgpool", _flatten, "classifier"),
    ),
    Family(
        "efficientnet",
        _is(tvm.EfficientNet),
        heads=("classifier",),
        program=("features", "avgpool", _flatten, "classifier"),
    ),
    Family(
        "mnasnet", _is(tvm.MNASNet), heads=("classifier",), program=("layers", _spatial_mean, "classifier")
    ),
    Family(
        "convnext", _is(tvm.ConvNeXt), heads=("classifier",), program=("features", "avgpool", "classifier")
    ),
    Family("maxvit", _is(tvm.MaxVit), heads=("classifier",), program=("stem", "blocks", "classifier")),
    # its head is the last 1x1 Conv2d of `classifier`
    Family(
        "squeezenet", _is(tvm.SqueezeNet), heads=("classifier",), program=("features", "classifier", _flatten)
    ),
    # timm's EfficientNet family, which the builtin Lite0 (tf_efficientnet_lite0) belongs to
    Family(
        "timm_efficientnet",
        _is_timm_efficientnet,
        swap="reset_classifier",
        program=_timm_efficientnet_program,
    ),
    Family("timm", _has_timm_contract, swap="reset_classifier"),
)
# Any other torchvision-style model: the head searched by its usual names, no split.
GENERIC = Family(
    "generic", lambda model: True, heads=("fc", "heads.head", "head", "classifier"),
    aux_heads=("aux1.fc2", "aux2.fc2", "AuxLogits.fc"),
)  # fmt: skip


def family_of(model: nn.Module) -> Family:
    """The row of `model`'s family; GENERIC when no row matches it."""
    return next((family for family in FAMILIES if family.matches(model)), GENERIC)


def fixed_build_kwargs(architecture: str) -> Mapping[str, Any]:
    """Builder arguments the family fixes for a torchvision architecture, whatever the weights."""
    return next((f.build_kwargs[architecture] for f in FAMILIES if architecture in f.build_kwargs), {})
