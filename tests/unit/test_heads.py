"""Head swap for every torchvision family and for timm models: new head, right output shape."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from service.errors import InvalidArgument
from service.training.architecture import build_architecture
from service.training.heads import find_head, replace_head

FAMILIES = [
    ("resnet18", 64, ("fc",)),
    ("regnet_x_400mf", 64, ("fc",)),
    ("shufflenet_v2_x0_5", 64, ("fc",)),
    ("googlenet", 64, ("fc",)),
    ("inception_v3", 80, ("fc",)),
    ("squeezenet1_1", 64, ("classifier.1",)),
    ("mobilenet_v3_small", 64, ("classifier.3",)),
    ("mnasnet0_5", 64, ("classifier.1",)),
    ("efficientnet_b0", 64, ("classifier.1",)),
    ("densenet121", 64, ("classifier",)),
    ("alexnet", 64, ("classifier.6",)),
    ("vgg11", 64, ("classifier.6",)),
    ("convnext_tiny", 64, ("classifier.2",)),
    ("swin_t", 64, ("head",)),
    ("maxvit_t", 224, ("classifier.5",)),
    ("vit_b_16", 224, ("heads.head",)),
    ("tf_efficientnet_lite0", 64, ("classifier",)),
    ("timm/convnext_atto", 64, ("head.fc",)),
]
REAL_FAST = {"resnet18", "squeezenet1_1", "mobilenet_v3_small", "tf_efficientnet_lite0", "timm/convnext_atto"}
_IDS = [a for a, _, _ in FAMILIES]


def _check_swap(architecture: str, size: int, expected: tuple[str, ...], device: str) -> None:
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = build_architecture(architecture)
    except NotImplementedError:  # RegNet computes its widths with tensors: no meta build
        model = build_architecture(architecture).to(device)
    old = model.get_submodule(expected[0])
    names = replace_head(model, 7)
    assert names == expected
    assert model.get_submodule(names[0]) is not old
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, size, size, device=device))
    assert out.shape == (2, 7)


@pytest.mark.parametrize(("architecture", "size", "expected"), FAMILIES, ids=_IDS)
def test_head_swap_gives_num_classes_outputs(architecture: str, size: int, expected: tuple[str, ...]) -> None:
    # shapes on the meta device: the same code path, no arithmetic, every family in well under a second
    _check_swap(architecture, size, expected, "meta")


@pytest.mark.parametrize(
    ("architecture", "size", "expected"),
    [
        pytest.param(*family, marks=() if family[0] in REAL_FAST else pytest.mark.slow, id=family[0])
        for family in FAMILIES
    ],
)
def test_head_swap_runs_for_real_on_the_cpu(architecture: str, size: int, expected: tuple[str, ...]) -> None:
    _check_swap(architecture, size, expected, "cpu")


def test_inception_aux_head_is_replaced_too() -> None:
    # shapes only: on the meta device a 299 px train-mode forward costs nothing
    with torch.device("meta"):
        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        names = replace_head(model, 7)
        out = model.train()(torch.zeros(2, 3, 299, 299))
    assert names == ("fc", "AuxLogits.fc")
    assert out.logits.shape == (2, 7) and out.aux_logits.shape == (2, 7)


def test_googlenet_aux_heads_are_replaced_too() -> None:
    with torch.device("meta"):
        model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
        names = replace_head(model, 7)
        out = model.train()(torch.zeros(2, 3, 224, 224))
    assert names == ("fc", "aux1.fc2", "aux2.fc2")
    assert [o.shape for o in out] == [(2, 7)] * 3


def test_squeezenet_head_is_a_fresh_1x1_conv() -> None:
    model = build_architecture("squeezenet1_1")
    replace_head(model, 3)
    conv = model.get_submodule("classifier.1")
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == 3 and conv.kernel_size == (1, 1)
    assert model.num_classes == 3


def test_find_head_does_not_change_the_model() -> None:
    model = build_architecture("mobilenet_v3_small")
    head = model.get_submodule("classifier.3")
    assert find_head(model) == ("classifier.3",)
    assert model.get_submodule("classifier.3") is head


def test_model_without_a_known_head_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cannot find the classification head"):
        replace_head(nn.Sequential(nn.Conv2d(3, 4, 3)), 2)


def test_zero_classes_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="num_classes must be at least 1"):
        replace_head(build_architecture("squeezenet1_1"), 0)
