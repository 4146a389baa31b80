"""The layer table ("blocks") of a model: the units a freeze request counts, and DescribeModel's rows.

The rule, deterministic for any nn.Module:
  1. Blocks are the model's top-level children, in registration order.
  2. A top-level child whose type is exactly nn.Sequential or nn.ModuleList is a container: its children
     become the blocks, named `<child>.<grandchild>` (one level only). Subclasses such as torchvision's
     Conv2dNormActivation are layers in their own right and stay whole.
  3. Except stages: when two or more top-level containers each hold copies of one and the same block
     type, each stays one block (ResNet's layer1..layer4 of BasicBlock, ShuffleNet's stage2..stage4).
So resnet18 is conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc; efficientnet_b0 is features.0 ..
features.8, avgpool, classifier.0, classifier.1; vit_b_16 is conv_proj, encoder, heads.head.
A block holding a head module is a head block; blocks before the first head block are freezable.
Parameters owned by the model itself (ViT's class token) are not in any block; they freeze with block 0.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.errors import InvalidArgument
from service.one_at_a_time import OneAtATime
from service.spec import FreezeSpec
from service.training import builder, heads, registry
from service.training.architecture import build_architecture

log = logging.getLogger(__name__)

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_HINT_BLOCKS = 6  # block names shown in an error message before "..."


@dataclass(frozen=True)
class LayerRow:
    """One block of the layer table (mirrors tuneserve.v1.LayerRow)."""

    index: int
    name: str
    type: str
    output_shape: tuple[int, ...]  # for a batch of 1 at the described image size; () if not run
    params: int
    frozen: bool
    is_head: bool


@dataclass(frozen=True)
class ModelDescription:
    """The layer table of an architecture and what a freeze request freezes (mirrors the proto)."""

    architecture: str
    image_size: int
    layers: tuple[LayerRow, ...]
    total_params: int
    trainable_params: int
    frozen_params: int
    freezable_blocks: int  # valid freeze depths are 0 .. freezable_blocks


@dataclass(frozen=True)
class BlockTable:
    """Block names in order, which are heads, and which block owns each qualified module name."""

    names: tuple[str, ...]
    is_head: tuple[bool, ...]
    owners: Mapping[str, int] = field(repr=False)  # module name -> index of the last block it covers

    @property
    def freezable_blocks(self) -> int:
        """The number of blocks before the first head block: the largest valid freeze depth."""
        return self.is_head.index(True) if True in self.is_head else len(self.names)

    def freeze_depth(self, freeze: FreezeSpec | None, architecture: str = "the model") -> int:
        """How many leading blocks `freeze` covers; InvalidArgument naming the field when it cannot."""
        limit = self.freezable_blocks
        if freeze is None or (freeze.depth is None and freeze.until_layer is None):
            return 0
        if freeze.depth is not None:
            if freeze.depth > limit:
                raise InvalidArgument(
                    f"freeze.depth {freeze.depth} is out of range for {architecture}: allowed 0..{limit} "
                    f"({self._head_note()}); {self._hint(architecture)}"
                )
            return freeze.depth
        name = str(freeze.until_layer)
        index = self.owners.get(name)
        if index is None:
            raise InvalidArgument(
                f"freeze.until_layer {name!r} is not a layer of {architecture}; blocks: "
                f"{self._first_names()}; a qualified module name inside a block works too; "
                f"{self._hint(architecture)}"
            )
        if index >= limit:
            raise InvalidArgument(
                f"freeze.until_layer {name!r} reaches the head of {architecture}, which is never frozen; "
                f"choose a block before {self.names[limit]!r}: {self._first_names()}; "
                f"{self._hint(architecture)}"
            )
        return index + 1

    def _first_names(self) -> str:
        shown = self.names[: min(_HINT_BLOCKS, self.freezable_blocks)]
        return ", ".join(shown) + (
            f", ... ({self.freezable_blocks} freezable)" if len(shown) < self.freezable_blocks else ""
        )

    def _head_note(self) -> str:
        limit = self.freezable_blocks
        return (
            f"{limit} blocks before the head {self.names[limit]}"
            if limit < len(self.names)
            else "no head found"
        )

    @staticmethod
    def _hint(architecture: str) -> str:
        return f"see `tuneserve describe {architecture}`"


def list_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of `model`, in order, by the rule in the module docstring."""
    children = list(model.named_children())
    stage_types = [_stage_type(m) for _, m in children]
    blocks: list[tuple[str, nn.Module]] = []
    for (name, module), stage_type in zip(children, stage_types, strict=True):
        is_stage = stage_type is not None and stage_types.count(stage_type) >= 2
        if type(module) in _CONTAINERS and any(True for _ in module.children()) and not is_stage:
            blocks += [(f"{name}.{sub}", child) for sub, child in module.named_children()]
        else:
            blocks.append((name, module))
    return blocks


def _stage_type(module: nn.Module) -> type[nn.Module] | None:
    """The one type of block a top-level container repeats, or None (not a container, or mixed)."""
    if type(module) not in _CONTAINERS:
        return None
    types = {type(child) for child in module.children()}
    return types.pop() if len(types) == 1 else None


def block_table(model: nn.Module, head_names: tuple[str, ...]) -> BlockTable:
    """The BlockTable of `model` whose head modules are `head_names`."""
    blocks = list_blocks(model)
    owners: dict[str, int] = {}
    for index, (name, module) in enumerate(blocks):
        owners[name] = index
        owners.update((f"{name}.{sub}", index) for sub, _ in module.named_modules() if sub)
        parent = name.rpartition(".")[0]
        if parent:  # an expanded container stands for all of its blocks
            owners[parent] = index
    is_head = tuple(any(h == name or h.startswith(f"{name}.") for h in head_names) for name, _ in blocks)
    if head_names and not any(is_head):  # a wrong name would make the head freezable
        raise ValueError(f"head modules {head_names} are not in {type(model).__name__}")
    return BlockTable(tuple(name for name, _ in blocks), is_head, owners)


def root_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters the model owns directly, outside every child (ViT's class token, timm's pos_embed)."""
    return model.parameters(recurse=False)


def describe_model(
    architecture: str,
    *,
    image_size: int | None,
    num_classes: int | None,
    freeze: FreezeSpec | None,
    torch_home: Path,
    weights: str = builder.DEFAULT_WEIGHTS,
) -> ModelDescription:
    """The layer table of `architecture` at `image_size` (default: the weights' crop size), `freeze` applied.

    No weights are read: the model is built with random weights, on the meta device when the
    architecture allows, so even huge models describe in well under a second. `weights` (a
    ModelSpec.weights value) only matters where it changes the architecture or the default size (a ViT's
    IMAGENET1K_SWAG_E2E_V1 is a 384 px model). `num_classes` None keeps the pretrained head's size.
    """
    arch = registry.check_architecture(architecture)
    crop_size, build_kwargs = _weights_shape(arch, weights, torch_home)
    size = image_size or crop_size
    key = (arch, build_kwargs, size, num_classes)
    rows, table, total = _ONE_BUILD.run(key, lambda: _describe_unfrozen(*key))
    depth = table.freeze_depth(freeze, arch)
    frozen = sum(row.params for row in rows[:depth]) + (rows[0].params_root if depth else 0)
    layers = tuple(
        LayerRow(r.index, r.name, r.type, r.output_shape, r.params, r.index < depth, r.is_head) for r in rows
    )
    log.debug("described %s at %d px from %s", arch, size, torch_home)
    return ModelDescription(arch, size, layers, total, total - frozen, frozen, table.freezable_blocks)


@functools.lru_cache(maxsize=64)
def _weights_shape(
    architecture: str, weights: str, torch_home: Path
) -> tuple[int, tuple[tuple[str, Any], ...]]:
    # A weights choice's crop size and builder arguments are torchvision's or timm's metadata, never a
    # file's. Asking torchvision's enums each time was a third of a CreateJob's admission (bench.create_cpu).
    shape = builder.weights_defaults(architecture, weights, torch_home)
    return shape.preprocessing.crop_size, shape.build_kwargs_key


@dataclass(frozen=True)
class _Row(LayerRow):
    params_root: int = 0  # root-level parameters, counted with block 0 when it freezes


_ONE_BUILD = OneAtATime()  # a burst of CreateJobs for a new architecture builds its table once


@functools.lru_cache(maxsize=32)
def _describe_unfrozen(
    architecture: str, build_kwargs: tuple[tuple[str, Any], ...], image_size: int, num_classes: int | None
) -> tuple[tuple[_Row, ...], BlockTable, int]:
    kwargs = dict(build_kwargs)
    meta = torch.device("meta")
    try:
        with meta:
            model = build_architecture(architecture, kwargs)
    except Exception as exc:  # RegNet computes its widths with tensors: build for real, then drop the data
        log.debug("meta build of %s failed (%s); building on the CPU", architecture, exc)
        model = build_architecture(architecture, kwargs).to(meta)
    try:
        return _run_description(model, architecture, image_size, num_classes)
    except _NoMetaKernel as exc:
        log.debug("meta forward of %s failed (%s); describing on the CPU", architecture, exc)
    return _run_description(build_architecture(architecture, kwargs), architecture, image_size, num_classes)


class _NoMetaKernel(Exception):
    """An op of the forward pass cannot run on the meta device (not a fault of the model or the size)."""


def _run_description(
    model: nn.Module, architecture: str, image_size: int, num_classes: int | None
) -> tuple[tuple[_Row, ...], BlockTable, int]:
    device = next(model.parameters()).device
    with device:  # a new head goes where the model is
        head_names = heads.replace_head(model, num_classes) if num_classes else heads.find_head(model)
    table = block_table(model, head_names)
    blocks = list_blocks(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(_shape_recorder(shapes, name)) for name, m in blocks]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as exc:
        if device.type == "meta" and (isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()):
            raise _NoMetaKernel(str(exc)) from exc
        raise InvalidArgument(f"{architecture} cannot run on {image_size} px images: {exc}") from exc
    finally:
        for hook in hooks:
            hook.remove()
    root = sum(p.numel() for p in root_parameters(model))
    rows = tuple(
        _Row(
            index=i,
            name=name,
            type=type(module).__name__,
            output_shape=shapes.get(name, ()),
            params=sum(p.numel() for p in module.parameters()),
            frozen=False,
            is_head=table.is_head[i],
            params_root=root if i == 0 else 0,
        )
        for i, (name, module) in enumerate(blocks)
    )
    total = sum(p.numel() for p in model.parameters())
    return rows, table, total


def _shape_recorder(shapes: dict[str, tuple[int, ...]], name: str) -> Any:
    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):  # e.g. a block returning (features, attention)
            output = next((o for o in output if isinstance(o, torch.Tensor)), None)
        if isinstance(output, torch.Tensor) and name not in shapes:
            shapes[name] = tuple(output.shape)

    return record
