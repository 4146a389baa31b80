"""Freezing: which parameters train, what frozen BatchNorm does, and the exact frozen-prefix split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.errors import InvalidArgument
from service.spec import FreezeSpec
from service.training.architecture import build_architecture
from service.training.freezing import apply_freeze, set_train_mode, split_frozen_prefix, trainable_parameters
from service.training.heads import replace_head


def _tiny() -> nn.Sequential:
    """conv -> bn -> relu -> pool -> flatten -> linear: blocks 0..5, head "5"."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _resnet18() -> tuple[nn.Module, tuple[str, ...]]:
    torch.manual_seed(0)
    model = build_architecture("resnet18")
    return model, replace_head(model, 3)


def _train_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    loss = model(torch.randn(8, 3, 16, 16)).square().mean()
    loss.backward()
    optimizer.step()


def test_freeze_by_depth_freezes_exactly_the_leading_blocks() -> None:
    model, heads = _resnet18()
    plan = apply_freeze(model, FreezeSpec(depth=5), heads)
    assert plan.frozen_blocks == ("conv1", "bn1", "relu", "maxpool", "layer1")
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert plan.frozen_params == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert plan.trainable_params == sum(p.numel() for p in trainable_parameters(model))


def test_freeze_until_a_block_name_includes_that_block() -> None:
    model, heads = _resnet18()
    assert apply_freeze(model, FreezeSpec(until_layer="layer2"), heads).depth == 6


def test_freeze_until_a_module_inside_a_block_freezes_the_whole_block() -> None:
    model, heads = _resnet18()
    plan = apply_freeze(model, FreezeSpec(until_layer="layer2.0.conv1"), heads)
    assert plan.frozen_blocks[-1] == "layer2" and not model.layer2[1].conv2.weight.requires_grad


def test_freeze_until_an_expanded_container_freezes_all_its_blocks() -> None:
    model = build_architecture("squeezenet1_1")
    plan = apply_freeze(model, FreezeSpec(until_layer="features"), replace_head(model, 2))
    assert plan.frozen_blocks[-1] == "features.12" and plan.depth == 13


def test_the_head_is_never_frozen() -> None:
    model, heads = _resnet18()
    plan = apply_freeze(model, FreezeSpec(depth=9), heads)
    assert plan.trainable_params == 512 * 3 + 3 and all(p.requires_grad for p in model.fc.parameters())


def test_a_depth_past_the_body_names_the_field_and_the_range() -> None:
    model, heads = _resnet18()
    with pytest.raises(InvalidArgument) as error:
        apply_freeze(model, FreezeSpec(depth=10), heads, architecture="resnet18")
    message = error.value.message
    assert "freeze.depth 10" in message and "0..9" in message and "tuneserve describe resnet18" in message


def test_an_unknown_layer_name_lists_the_blocks() -> None:
    model, heads = _resnet18()
    with pytest.raises(InvalidArgument, match=r"freeze\.until_layer 'layer9' .*conv1, bn1, relu"):
        apply_freeze(model, FreezeSpec(until_layer="layer9"), heads, architecture="resnet18")


def test_freezing_until_the_head_is_refused() -> None:
    model, heads = _resnet18()
    with pytest.raises(InvalidArgument, match=r"freeze\.until_layer 'fc' reaches the head"):
        apply_freeze(model, FreezeSpec(until_layer="fc"), heads, architecture="resnet18")


def test_a_new_plan_unfreezes_what_the_old_one_froze() -> None:
    model, heads = _resnet18()
    apply_freeze(model, FreezeSpec(depth=8), heads)
    plan = apply_freeze(model, FreezeSpec(), heads)
    assert plan.depth == 0 and all(p.requires_grad for p in model.parameters())


def test_batchnorm_eval_policy_keeps_frozen_running_stats() -> None:
    model = _tiny()
    plan = apply_freeze(model, FreezeSpec(depth=2, batchnorm="eval"), ("5",))
    set_train_mode(model, plan, "eval")
    before = model[1].running_mean.clone()
    _train_step(model)
    assert torch.equal(model[1].running_mean, before) and not model[1].training and model[5].training


def test_batchnorm_train_policy_updates_frozen_running_stats_but_not_weights() -> None:
    model = _tiny()
    plan = apply_freeze(model, FreezeSpec(depth=2, batchnorm="train"), ("5",))
    set_train_mode(model, plan, "train")
    mean, weight = model[1].running_mean.clone(), model[1].weight.clone()
    _train_step(model)
    assert not torch.equal(model[1].running_mean, mean) and torch.equal(model[1].weight, weight)


def test_optimizer_sees_only_trainable_parameters() -> None:
    model = _tiny()
    apply_freeze(model, FreezeSpec(depth=2), ("5",))
    assert {id(p) for p in trainable_parameters(model)} == {id(model[5].weight), id(model[5].bias)}


def test_unknown_batchnorm_policy_is_refused() -> None:
    model = _tiny()
    plan = apply_freeze(model, FreezeSpec(depth=1), ("5",))
    with pytest.raises(InvalidArgument, match="eval, train"):
        set_train_mode(model, plan, "frozen")


SPLITTABLE = [
    ("resnet18", 2),  # the rest starts with an in-place ReLU on the prefix's output
    ("efficientnet_b0", 9),
    ("densenet121", 12),
    ("mobilenet_v2", 5),
    ("squeezenet1_1", 2),
    ("shufflenet_v2_x0_5", 5),
    ("mnasnet0_5", 8),
    ("regnet_x_400mf", 3),
    ("tf_efficientnet_lite0", 9),  # timm's EfficientNet with TF "SAME" padding: the demo's builtin
    ("timm/efficientnet_lite0", 9),  # the same family padded the PyTorch way (pre-fix checkpoints)
]


@pytest.mark.parametrize(("architecture", "depth"), SPLITTABLE, ids=[a for a, _ in SPLITTABLE])
def test_frozen_prefix_split_is_exact(architecture: str, depth: int) -> None:
    torch.manual_seed(0)
    model = build_architecture(architecture)
    plan = apply_freeze(model, FreezeSpec(depth=depth), replace_head(model, 3))
    split = split_frozen_prefix(model, plan)
    assert split is not None and split.depth == depth
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(x)
        features = split.prefix(x)
        cached = features.clone()
        assert torch.equal(split.rest(features), expected)
    assert torch.equal(features, cached)  # the rest never writes into the prefix's output


@pytest.mark.parametrize("architecture", ["googlenet", "inception_v3"])
def test_no_split_where_the_forward_is_not_a_chain_of_blocks(architecture: str) -> None:
    model = build_architecture(architecture)
    plan = apply_freeze(model, FreezeSpec(depth=3), replace_head(model, 3))
    assert split_frozen_prefix(model, plan) is None


def test_timm_efficientnet_split_keeps_its_head_dropout_in_training() -> None:
    import timm

    model = timm.create_model("efficientnet_lite0", drop_rate=0.3, num_classes=3)
    plan = apply_freeze(model, FreezeSpec(until_layer="blocks.6"), ("classifier",))
    split = split_frozen_prefix(model, plan)
    assert split is not None
    model.train()
    set_train_mode(model, plan, "eval")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model(x)
        torch.manual_seed(5)
        actual = split.rest(split.prefix(x))
        torch.manual_seed(6)
        other = split.rest(split.prefix(x))
    assert torch.equal(actual, expected)
    assert not torch.equal(other, expected)  # dropout really runs in the split's rest


def test_no_split_when_nothing_is_frozen() -> None:
    model, heads = _resnet18()
    assert split_frozen_prefix(model, apply_freeze(model, FreezeSpec(), heads)) is None
