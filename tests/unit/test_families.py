"""The model family table (service.training.families): every row resolves, names the head that is
really replaced, and says truly whether its frozen prefix splits off."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from service.spec import FreezeSpec
from service.training import registry
from service.training.architecture import build_architecture
from service.training.families import FAMILIES, GENERIC, family_of
from service.training.freezing import apply_freeze, split_frozen_prefix
from service.training.heads import find_head, replace_head

# one architecture per row, and the image size it runs at
EXAMPLES = {
    "resnet": ("resnet18", 64),
    "regnet": ("regnet_x_400mf", 64),
    "shufflenet": ("shufflenet_v2_x0_5", 64),
    "googlenet": ("googlenet", 64),
    "inception": ("inception_v3", 80),
    "vit": ("vit_b_16", 224),
    "swin": ("swin_t", 64),
    "densenet": ("densenet121", 64),
    "alexnet": ("alexnet", 64),
    "vgg": ("vgg11", 64),
    "mobilenet_v2": ("mobilenet_v2", 64),
    "mobilenet_v3": ("mobilenet_v3_small", 64),
    "efficientnet": ("efficientnet_b0", 64),
    "mnasnet": ("mnasnet0_5", 64),
    "convnext": ("convnext_tiny", 64),
    "maxvit": ("maxvit_t", 224),
    "squeezenet": ("squeezenet1_1", 64),
    "timm_efficientnet": ("tf_efficientnet_lite0", 64),  # the builtin Lite0
    "timm": ("timm/convnext_atto", 64),
}


def build(architecture: str) -> nn.Module:
    torch.manual_seed(0)
    if architecture.startswith("regnet_"):  # computes its widths with tensors: no meta build
        return build_architecture(architecture)
    with torch.device("meta"):
        return build_architecture(architecture)


def test_every_row_has_an_example_here() -> None:
    assert set(EXAMPLES) == {family.name for family in FAMILIES}


@pytest.mark.parametrize("row", list(EXAMPLES))
def test_each_row_resolves_and_names_the_head_that_produces_the_scores(row: str) -> None:
    architecture, size = EXAMPLES[row]
    model = build(architecture)
    assert family_of(model).name == row
    named = find_head(model)
    old = model.get_submodule(named[0])
    assert replace_head(model, 7) == named
    new = model.get_submodule(named[0])
    assert new is not old
    fired: list[torch.Size] = []
    new.register_forward_hook(lambda _m, _i, output: fired.append(output.shape))
    device = next(model.parameters()).device
    with torch.no_grad():
        scores = model.eval()(torch.zeros(1, 3, size, size, device=device))
    assert fired and fired[0][1] == 7  # the named head ran, with the new width ...
    assert scores.shape == (1, 7)  # ... and the model's scores come from it


@pytest.mark.parametrize("row", list(EXAMPLES))
def test_a_row_splits_its_frozen_prefix_exactly_when_it_says_so(row: str) -> None:
    model = build(EXAMPLES[row][0])
    plan = apply_freeze(model, FreezeSpec(depth=1), replace_head(model, 3))
    assert (split_frozen_prefix(model, plan) is not None) == family_of(model).splits


def test_googlenet_is_built_as_its_row_fixes_it_without_auxiliary_classifiers() -> None:
    model = build("googlenet")
    assert model.aux1 is None and model.transform_input is True  # type: ignore[union-attr]


def test_a_subclass_gets_the_generic_row_heads_found_by_name_and_no_split() -> None:
    class Custom(torchvision.models.ResNet):  # may override forward: its program is unknown
        pass

    model = Custom(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=4)
    assert family_of(model) is GENERIC
    assert replace_head(model, 3) == ("fc",)
    assert split_frozen_prefix(model, apply_freeze(model, FreezeSpec(depth=2), ("fc",))) is None


@pytest.mark.slow
def test_every_torchvision_architecture_has_its_own_row() -> None:
    generic = []
    for architecture in registry._torchvision_names():
        if architecture.startswith("regnet_"):
            continue  # no meta build; the row is checked on regnet_x_400mf above
        if family_of(build(architecture)) is GENERIC:
            generic.append(architecture)
    assert generic == []
