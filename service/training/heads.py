"""Find and replace the classification head of a torchvision or timm model, as its family's row says.

Where a head is and how it is swapped is the family table's (service.training.families): timm models
through `reset_classifier`; torchvision models by the first of the row's head names the model has (a
Linear; or the last Linear of a Sequential; squeezenet: its last 1x1 Conv2d), plus the auxiliary
classifiers when the model has them. Every new head layer is freshly initialised, on the old layer's
device and dtype.
"""

from __future__ import annotations

import logging
from typing import cast

from torch import nn
from torchvision.models import SqueezeNet

from service.errors import InvalidArgument
from service.training.families import family_of

log = logging.getLogger(__name__)


def find_head(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the modules that produce the class scores (main head first, then aux heads)."""
    family = family_of(model)
    if family.swap == "reset_classifier":
        return _timm_head_names(model)
    modules = dict(model.named_modules())
    for path in family.heads:
        module = modules.get(path)
        if module is None:
            continue
        name = path if isinstance(module, nn.Linear) else _last_classifier_layer(path, module)
        if name is not None:
            aux = [p for p in family.aux_heads if isinstance(modules.get(p), nn.Linear)]
            return (name, *aux)
    raise InvalidArgument(
        f"cannot find the classification head of {type(model).__name__}: expected a timm model or a "
        f"torchvision classifier with one of {', '.join(family.heads)}"
    )


def replace_head(model: nn.Module, num_classes: int) -> tuple[str, ...]:
    """Swap the head(s) for fresh ones with `num_classes` outputs; returns their qualified names."""
    if num_classes < 1:
        raise InvalidArgument(f"num_classes must be at least 1 (got {num_classes})")
    if family_of(model).swap == "reset_classifier":
        model.reset_classifier(num_classes)  # type: ignore[operator]
        names = _timm_head_names(model)
    else:
        names = find_head(model)
        for name in names:
            _set_submodule(model, name, _fresh_layer(model.get_submodule(name), num_classes))
        if isinstance(model, SqueezeNet):  # it keeps the count as an attribute
            model.num_classes = num_classes
    log.debug("new head %s with %d outputs on %s", names, num_classes, type(model).__name__)
    return names


def _timm_head_names(model: nn.Module) -> tuple[str, ...]:
    heads = model.get_classifier()  # type: ignore[operator]
    heads = heads if isinstance(heads, tuple) else (heads,)  # distilled models have two heads
    names = tuple(name for head in heads for name, module in model.named_modules() if module is head)
    if not names or any(isinstance(m, nn.Identity) for m in heads):
        raise InvalidArgument(f"the timm model {type(model).__name__} has no classification head to replace")
    return names


def _last_classifier_layer(path: str, container: nn.Module) -> str | None:
    # a Linear head ends most Sequentials; squeezenet ends with Conv2d(512, classes, 1), ReLU, pool
    children = list(container.named_children())
    for kind in (nn.Linear, nn.Conv2d):
        matches = [name for name, child in children if isinstance(child, kind)]
        if matches:
            return f"{path}.{matches[-1]}"
    return None


def _fresh_layer(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(
            old.in_features,
            num_classes,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
    if isinstance(old, nn.Conv2d):
        conv = nn.Conv2d(
            old.in_channels,
            num_classes,
            kernel_size=cast(tuple[int, int], old.kernel_size),
            stride=cast(tuple[int, int], old.stride),
            padding=cast(tuple[int, int], old.padding),
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        # torchvision's own init for squeezenet's final conv: the default (kaiming) one trains poorly
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        return conv
    raise InvalidArgument(f"cannot replace a head of type {type(old).__name__} (expected Linear or Conv2d)")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
