"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.spec import JobSpec, ModelSpec
from service.training.builder import build_model
from service.training.checkpoints import make_checkpoint, save_checkpoint

# postgres_server / postgres_database: one throw-away PostgreSQL for the whole session;
# store_location / store: a job store on each backend (parametrized)
pytest_plugins = ["tests.pg", "tests.store_backends"]


@pytest.fixture(autouse=True)
def _pil_bomb_limit_restored() -> Any:
    """A job's prepare() sets PIL's process-wide bomb limit (right in a worker process); tests that run
    it in-process must not leave it set for the tests after them."""
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.fixture(autouse=True)
def _sys_path_restored() -> Any:
    """The handler's initialize() puts its archive's folder first on sys.path (right in TorchServe's
    worker); tests that run it in-process must not leave it there: a spawned child inherits sys.path and
    would import the archive's partial `service` package (a test after them then fails, depending on
    which tests shared its process)."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


# ------------------------------------------------------------------------------------------ serving


def make_serving_checkpoint(
    path: Path,
    *,
    task: str = "multiclass",
    class_names: tuple[str, ...] = ("cat", "dog", "fox", "owl", "yak"),
    architecture: str = "mobilenet_v3_small",
    image_size: int = 64,
    seed: int = 0,
    top_k: int = 3,
) -> dict[str, Any]:
    """A format-valid checkpoint of a small random model, with a sharp head so classes rarely tie."""
    torch.manual_seed(seed)
    spec = JobSpec.model_validate(
        {
            "name": "serving-test",
            "task": task,
            "model": {"architecture": architecture, "weights": "none"},
            "data": {"path": "unused", **({"manifest": "unused.csv"} if task == "multilabel" else {})},
            "serving": {"top_k": top_k},
        }
    )
    units = 1 if task == "binary" else len(class_names)
    model_spec = ModelSpec.model_validate({"architecture": architecture, "weights": "none"})
    built = build_model(model_spec, units, torch_home=path.parent)
    with torch.no_grad():
        # Calibrate BatchNorm on varied pictures so a random network's outputs depend on its input.
        for module in built.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        built.model.train()(torch.randn(16, 3, image_size, image_size) * 2)
        for name in built.head_names:
            for parameter in built.model.get_submodule(name).parameters():
                parameter.mul_(5.0)
    model_config = {
        **built.model_config,
        "task": task,
        "image_size": image_size,
        "resize_size": round(image_size * 256 / 224),
        "mean": list(built.preprocessing.mean),
        "std": list(built.preprocessing.std),
        "interpolation": built.preprocessing.interpolation,
        "threshold": 0.5,
        "class_names": list(class_names),
        "top_k": top_k,
    }
    state = make_checkpoint(
        model=built.model.eval().state_dict(),
        optimizer={},
        scheduler=None,
        scaler={},
        epoch=1,
        step=1,
        history=[{"epoch": 1, "val_loss": 1.0}],
        early_stopping={},
        rng={},
        spec=spec.to_dict(),
        class_names=list(class_names),
        wandb_run_id=None,
        metrics={"val_loss": 1.0},
        model_config=model_config,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)
    return state


def image_bytes(seed: int, size: tuple[int, int] = (80, 60), fmt: str = "PNG") -> bytes:
    """A deterministic picture (a colour gradient plus noise, different per seed), encoded."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * rng.uniform(-255, 255, size=3)
    base = rng.uniform(0, 255, size=3) + ramp + rng.normal(0, 20, size=(height, width, 3))
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def serving_checkpoint_factory() -> Any:
    """make_serving_checkpoint(path, *, task=..., class_names=..., seed=...) -> the checkpoint dict."""
    return make_serving_checkpoint


@pytest.fixture(scope="session")
def serving_images() -> list[bytes]:
    """Six small held-out-like pictures, PNG and JPEG, of different sizes."""
    return [image_bytes(i, (60 + 7 * i, 90 - 5 * i), "PNG" if i % 2 else "JPEG") for i in range(6)]


@pytest.fixture(scope="session")
def serving_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serving") / "checkpoints" / "best.pt"
    make_serving_checkpoint(path)
    return path
