"""Freeze the leading blocks of the layer table, and decide what frozen BatchNorm layers do.

Freezing sets `requires_grad=False` on every parameter of blocks [0, depth) (and on the model's own
root-level parameters, such as ViT's class token, with block 0). Head blocks are never frozen. The
BatchNorm policy is explicit: `eval` puts frozen blocks in eval mode during training (running
statistics stay fixed, dropout inside them is off), `train` lets frozen BatchNorm layers keep updating
their running statistics. The optimizer sees only `trainable_parameters(model)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from service.errors import InvalidArgument
from service.spec import FreezeSpec
from service.training.families import family_of
from service.training.layers import block_table, list_blocks, root_parameters

log = logging.getLogger(__name__)

BATCHNORM_POLICIES = ("eval", "train")


@dataclass(frozen=True)
class FreezePlan:
    """What apply_freeze froze."""

    depth: int  # blocks [0, depth) of the layer table are frozen
    frozen_blocks: tuple[str, ...]
    frozen_params: int
    trainable_params: int
    frozen_modules: tuple[nn.Module, ...] = field(repr=False, compare=False)


def apply_freeze(
    model: nn.Module, freeze: FreezeSpec, head_names: tuple[str, ...], *, architecture: str = "the model"
) -> FreezePlan:
    """Freeze the blocks `freeze` names (InvalidArgument when it cannot) and unfreeze everything else."""
    table = block_table(model, head_names)
    depth = table.freeze_depth(freeze, architecture)
    blocks = list_blocks(model)[:depth]
    for param in model.parameters():
        param.requires_grad_(True)
    frozen_modules = tuple(module for _, module in blocks)
    frozen_params = [*root_parameters(model)] if depth else []
    frozen_params += [p for module in frozen_modules for p in module.parameters()]
    for param in frozen_params:
        param.requires_grad_(False)
    frozen = sum(p.numel() for p in {id(p): p for p in frozen_params}.values())
    total = sum(p.numel() for p in model.parameters())
    plan = FreezePlan(depth, tuple(name for name, _ in blocks), frozen, total - frozen, frozen_modules)
    log.info("froze %d blocks of %s (%d of %d parameters)", depth, architecture, frozen, total)
    return plan


def set_train_mode(model: nn.Module, plan: FreezePlan, batchnorm: str) -> None:
    """model.train(), then frozen blocks back to eval() under the `eval` BatchNorm policy."""
    if batchnorm not in BATCHNORM_POLICIES:
        raise InvalidArgument(
            f"freeze.batchnorm {batchnorm!r} is unknown; allowed: {', '.join(BATCHNORM_POLICIES)}"
        )
    model.train()
    if batchnorm == "eval":
        for module in plan.frozen_modules:
            module.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should update (those that still require grad)."""
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- running the frozen prefix apart

Step = nn.Module | Callable[[torch.Tensor], torch.Tensor]


class Chain:
    """Calls steps in order. Holds references to the model's modules; registers none of them."""

    def __init__(self, steps: Sequence[Step], *, copy_input: bool = False) -> None:
        self.steps = tuple(steps)
        self.copy_input = copy_input

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:  # the first step may be an in-place ReLU: never modify (cached) features
            x = x.clone()
        for step in self.steps:
            x = step(x)
        return x


class TrainablePart(nn.Module):
    """The layers after the frozen prefix as one Module: what DDP wraps to average their gradients, what
    the tracer needs, and the name the Graphs tab shows. Its module steps are registered so their
    parameters (and names) are found."""

    def __init__(self, chain: Chain) -> None:
        super().__init__()
        self.chain = chain
        self.blocks = nn.ModuleList(step for step in chain.steps if isinstance(step, nn.Module))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain(x)


@dataclass(frozen=True)
class FrozenSplit:
    """model(x) == rest(prefix(x)), exactly. Run `prefix` under torch.no_grad().

    Its outputs may be cached across epochs only when the frozen blocks are in eval mode (BatchNorm
    policy `eval`) and the input is deterministic (no random augmentation).
    """

    prefix: Chain
    rest: Chain
    depth: int


def split_frozen_prefix(model: nn.Module, plan: FreezePlan) -> FrozenSplit | None:
    """The frozen prefix and the rest of the forward pass as two callables, or None.

    None when nothing is frozen, or when the family's forward is not a plain chain of its blocks (its
    row in service.training.families has no program): then run the whole model; frozen parameters get
    no gradient either way.
    """
    program = family_of(model).forward_program(model)
    if program is None or plan.depth == 0 or any(True for _ in root_parameters(model)):
        return None
    blocks = list_blocks(model)
    modules = dict(blocks)
    steps: list[tuple[int | None, Step]] = []  # (block index or None for an op, the step)
    for item in program:
        if not isinstance(item, str):
            steps.append((None, item))
            continue
        names = [n for n, _ in blocks if n == item or n.startswith(f"{item}.")]
        steps += [(next(i for i, (n, _) in enumerate(blocks) if n == name), modules[name]) for name in names]
    order = [index for index, _ in steps if index is not None]
    if order != list(range(len(blocks))):  # the table and the program disagree: not exact, do not split
        log.warning("cannot split %s: its forward program does not match its blocks", type(model).__name__)
        return None
    cut = next(k for k, (index, _) in enumerate(steps) if index == plan.depth - 1) + 1
    prefix = Chain([step for _, step in steps[:cut]])
    rest = Chain([step for _, step in steps[cut:]], copy_input=True)
    return FrozenSplit(prefix, rest, plan.depth)
