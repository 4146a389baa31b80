"""The layer table: the block rule, and describe_model's rows, totals and freeze preview."""

from __future__ import annotations

from pathlib import Path

import pytest
import torchvision
from at_once import at_once
from torch import nn

from service.errors import InvalidArgument
from service.spec import FreezeSpec
from service.training import layers
from service.training.layers import ModelDescription, describe_model, list_blocks

RESNET18_BLOCKS = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]


def _describe(
    architecture: str,
    image_size: int | None = 64,
    *,
    num_classes: int | None = None,
    freeze: FreezeSpec | None = None,
    weights: str = "DEFAULT",
) -> ModelDescription:
    # torch_home is never read: describing needs no weights
    return describe_model(
        architecture,
        image_size=image_size,
        num_classes=num_classes,
        freeze=freeze,
        torch_home=Path("/nonexistent"),
        weights=weights,
    )


def test_resnet18_rows_at_64_px() -> None:
    description = _describe("resnet18", num_classes=10)
    rows = {row.name: row for row in description.layers}
    assert [row.name for row in description.layers] == RESNET18_BLOCKS
    assert [row.index for row in description.layers] == list(range(10))
    assert rows["conv1"].type == "Conv2d" and rows["conv1"].output_shape == (1, 64, 32, 32)
    assert rows["layer1"].type == "Sequential" and rows["layer4"].output_shape == (1, 512, 2, 2)
    assert rows["fc"].output_shape == (1, 10) and rows["fc"].params == 512 * 10 + 10
    assert [row.name for row in description.layers if row.is_head] == ["fc"]
    assert description.freezable_blocks == 9 and description.image_size == 64


def test_resnet18_totals_match_the_real_model() -> None:
    description = _describe("resnet18")
    real = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    assert description.total_params == real == description.trainable_params
    assert sum(row.params for row in description.layers) == real and description.frozen_params == 0


def test_freeze_preview_marks_blocks_and_counts_parameters() -> None:
    description = _describe("resnet18", freeze=FreezeSpec(depth=5))
    frozen = [row for row in description.layers if row.frozen]
    assert [row.name for row in frozen] == RESNET18_BLOCKS[:5]
    assert description.frozen_params == sum(row.params for row in frozen)
    assert description.trainable_params == description.total_params - description.frozen_params


def test_freeze_preview_refuses_a_depth_reaching_the_head() -> None:
    with pytest.raises(InvalidArgument, match=r"freeze\.depth 10 .* allowed 0\.\.9"):
        _describe("resnet18", freeze=FreezeSpec(depth=10))


def test_sequential_containers_expand_one_level() -> None:
    names = [row.name for row in _describe("efficientnet_b0").layers]
    assert names == [*(f"features.{i}" for i in range(9)), "avgpool", "classifier.0", "classifier.1"]


def test_vit_class_token_freezes_with_the_first_block() -> None:
    description = _describe("vit_b_16", image_size=224, freeze=FreezeSpec(depth=1))
    assert [row.name for row in description.layers] == ["conv_proj", "encoder", "heads.head"]
    assert description.frozen_params == description.layers[0].params + 768  # + the class token


def test_timm_and_builtin_models_have_tables_too() -> None:
    lite0 = _describe("efficientnet_lite0")  # the builtin's alias: the table is of the network it builds
    assert lite0.architecture == "tf_efficientnet_lite0"
    assert [row.name for row in lite0.layers][:4] == ["conv_stem", "bn1", "blocks.0", "blocks.1"]
    assert lite0.layers[0].type == "Conv2dSame"  # TensorFlow's "SAME" padding
    assert lite0.layers[-1].name == "classifier" and lite0.layers[-1].is_head
    atto = _describe("timm/convnext_atto", num_classes=3)
    assert atto.layers[-1].name == "head" and atto.layers[-1].output_shape == (1, 3)


def test_default_image_size_is_the_weights_crop_size() -> None:
    assert _describe("squeezenet1_1", image_size=None).image_size == 224
    assert _describe("vit_b_16", image_size=None, weights="IMAGENET1K_SWAG_E2E_V1").image_size == 384


def test_each_weights_choice_keeps_its_own_size_once_cached() -> None:
    # what a weights choice implies is cached per choice: alternating two for one network must not mix them
    for _ in range(2):
        assert _describe("vit_b_16", image_size=None, weights="IMAGENET1K_SWAG_E2E_V1").image_size == 384
        assert _describe("vit_b_16", image_size=None, weights="IMAGENET1K_V1").image_size == 224
        assert _describe("vit_b_16", image_size=None, weights="IMAGENET1K_SWAG_LINEAR_V1").image_size == 224


def test_an_image_size_the_model_cannot_take_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="inception_v3 cannot run on 32 px images"):
        _describe("inception_v3", image_size=32)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="did you mean"):
        _describe("resnet181")


def test_stages_of_one_block_type_stay_whole_but_mixed_containers_expand() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.stage1 = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
            self.stage2 = nn.Sequential(nn.Conv2d(4, 4, 3))
            self.head = nn.Linear(4, 2)

    names = [name for name, _ in list_blocks(Net())]
    assert names == ["stem.0", "stem.1", "stage1", "stage2", "head"]


def test_a_lone_container_of_one_block_type_expands() -> None:
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
    model.add_module("head", nn.Linear(2, 2))
    assert [name for name, _ in list_blocks(model)] == ["blocks.0", "blocks.1", "head"]


def test_callers_that_miss_together_build_the_model_once() -> None:
    # a fresh replica's first burst of CreateJobs for one architecture: one build, the others wait for it
    misses = layers._describe_unfrozen.cache_info().misses
    results = at_once(8, lambda: _describe("resnet34", image_size=88, num_classes=5))
    assert all(isinstance(r, ModelDescription) and r == results[0] for r in results), results
    assert results[0].layers[-1].output_shape == (1, 5)
    assert layers._describe_unfrozen.cache_info().misses - misses == 1


def test_callers_waiting_on_a_build_that_fails_get_the_error_too() -> None:
    errors = at_once(4, lambda: _describe("inception_v3", image_size=32))
    assert all(isinstance(e, InvalidArgument) and "cannot run on 32 px images" in e.message for e in errors)
