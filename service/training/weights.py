"""Resolve and load pretrained weights, offline.

`ModelSpec.weights` is `DEFAULT`, a named torchvision weights set (`IMAGENET1K_V1`), `none` (random
init) or `file` (a local state_dict in `weights_file`). Weights are only ever read from local files
(see service.training.registry for where); a missing file is a FailedPrecondition that names the path
and the command that fetches it. Nothing here falls back to random weights.

A user's `weights_file` is confined to the weights root (TUNESERVE_WEIGHTS_ROOT), as datasets are to the
data root: a path that leaves it is refused without a word on whether it exists, so the API cannot be
used to probe or read the server's other files.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from service.errors import FailedPrecondition, InvalidArgument
from service.spec import ModelSpec
from service.training import registry

log = logging.getLogger(__name__)

NONE = "none"
FILE = "file"
DEFAULT = registry.DEFAULT

# Auxiliary classifiers (GoogLeNet, Inception v3) are in torchvision's checkpoints, but our builds drop them.
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
# torchvision's DenseNet checkpoints name keys `norm.1`, the modules `norm1`: rename (as torchvision does).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights choice, checked against the architecture; `file` is where its state_dict is read from."""

    architecture: str
    source: str  # torchvision | timm | builtin
    name: str  # none | file | DEFAULT (timm, builtin) | a torchvision weights enum member name
    file: Path | None
    torchvision_weights: torchvision.models.WeightsEnum | None = None

    @property
    def pretrained(self) -> bool:
        return self.name != NONE


def resolve_weights(
    model_spec: ModelSpec, torch_home: Path, *, weights_root: Path | None = None, require_file: bool = True
) -> ResolvedWeights:
    """Check the weights name against the architecture and, unless told not to, that the file is here.

    A `file` choice is resolved under `weights_root`; without a root no user file can be read.
    """
    arch = registry.check_architecture(model_spec.architecture)
    source = registry.source_of(arch)
    name = model_spec.weights
    if name == NONE:
        resolved = ResolvedWeights(arch, source, NONE, None)
    elif name == FILE:
        given = model_spec.weights_file or ""
        file = None if weights_root is None else confine_weights_file(given, weights_root)
        resolved = ResolvedWeights(arch, source, FILE, file)
    elif source == "torchvision":
        member = _torchvision_member(arch, name)
        file = registry.torchvision_weights_file(member, torch_home)
        resolved = ResolvedWeights(arch, source, member.name, file, member)
    elif name != DEFAULT:
        raise InvalidArgument(
            f"model.weights {name!r} is unknown for {arch}; allowed: {DEFAULT}, {NONE}, {FILE} "
            f"(see `tuneserve models --source {source}`)"
        )
    elif source == "builtin":
        resolved = ResolvedWeights(arch, source, DEFAULT, registry.lite0_weights_file())
    else:
        files = registry.timm_weights_files(arch, torch_home)
        resolved = ResolvedWeights(arch, source, DEFAULT, next((f for f in files if f.is_file()), files[0]))
    if require_file:
        require_weights_file(resolved)
    return resolved


def confine_weights_file(weights_file: str, weights_root: Path) -> Path:
    """`weights_file` (relative to the weights root, or absolute) with `..` and symlinks resolved.

    InvalidArgument when it leaves the root, decided before anything outside is looked at: by the
    path's text (`/etc/passwd`, `../x`) and then by where symlinks inside the root lead. The message
    is the same whether or not the file exists.
    """
    root = weights_root.resolve()
    outside = InvalidArgument(
        f"model.weights_file {weights_file[:200]!r} is outside the weights root {root}; put the state_dict "
        "under that folder (TUNESERVE_WEIGHTS_ROOT) and give its path relative to it"
    )
    if not Path(os.path.normpath(root / weights_file)).is_relative_to(root):
        raise outside
    try:
        resolved = (root / weights_file).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # ValueError: a NUL; RuntimeError: a symlink loop
        raise InvalidArgument(
            f"model.weights_file {weights_file[:200]!r} is not a usable path ({exc}); give a path relative "
            "to the weights root, of printable characters and at most 255 per name"
        ) from None
    if not resolved.is_relative_to(root):
        raise outside
    return resolved


def require_weights_file(resolved: ResolvedWeights) -> None:
    """FailedPrecondition naming the expected path and the fix, when the weights file is not on disk."""
    if not resolved.pretrained or (resolved.file is not None and _is_file(resolved.file)):
        return
    if resolved.name == FILE and resolved.file is None:  # a caller that gave no weights root
        raise FailedPrecondition("model.weights_file cannot be read: this service has no weights root")
    if resolved.name == FILE:  # inside the weights root (confine_weights_file): existence may be said
        raise FailedPrecondition(
            f"model.weights_file {str(resolved.file)[:200]!r} does not exist or is not a file under the "
            "weights root; put the state_dict (.pt/.pth/.safetensors) there and give its path"
        )
    if resolved.source == "builtin":
        raise FailedPrecondition(
            f"the ImageNet weights of {resolved.architecture} come from a Python package that is not "
            f"installed; fix: `{registry.fetch_command(resolved.architecture)}`, or use weights='none'"
        )
    raise FailedPrecondition(
        f"pretrained weights {resolved.architecture}:{resolved.name} are not on this machine: expected "
        f"{resolved.file}. Fix: run `{registry.fetch_command(resolved.architecture, resolved.name)}` on a "
        f"machine with internet and copy the file to {resolved.file} (the service's TORCH_HOME is "
        f"{_torch_home_of(resolved.file)}), or use weights='none' to start from random weights"
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a user-given name the OS cannot look up (too long): as good as missing
        return False


def read_state_dict(resolved: ResolvedWeights, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a resolved (pretrained) weights choice, with keys in `model`'s naming."""
    require_weights_file(resolved)
    assert resolved.file is not None
    if resolved.name == FILE:
        return _read_user_file(resolved.file)
    if resolved.source == "builtin":
        return convert_lite0_state_dict(_read_file(resolved.file), model.state_dict())
    if resolved.source == "timm":
        return _read_file(resolved.file)
    assert resolved.torchvision_weights is not None
    # the file exists, so torch.hub reads it from model_dir and never touches the network
    state = resolved.torchvision_weights.get_state_dict(
        model_dir=str(resolved.file.parent), map_location="cpu", progress=False, weights_only=True
    )
    if resolved.architecture.startswith("densenet"):
        return {_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    return state  # keeps its _metadata: module format versions


def load_weights(model: nn.Module, resolved: ResolvedWeights, head_names: Iterable[str]) -> None:
    """Load pretrained weights into `model` (before its head is swapped), checking every key and shape.

    Tensors of the head modules (`head_names`) may differ in shape, since the head is replaced next;
    every other missing, unexpected or differently shaped tensor is a FailedPrecondition.
    """
    if not resolved.pretrained:
        return
    state = read_state_dict(resolved, model)
    expected = model.state_dict()
    heads = tuple(f"{h}." for h in head_names)
    where = f"weights {resolved.name} ({resolved.file}) for {resolved.architecture}"
    wrong = [
        f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape and not k.startswith(heads)
    ]
    _refuse_if(wrong, "with a different shape", where)
    usable = OrderedDict(
        (k, v)
        for k, v in state.items()
        if not (k.startswith(heads) and k in expected and v.shape != expected[k].shape)
    )
    # Modules read their format version from the metadata (MNASNet refuses to load without it, old
    # BatchNorm checkpoints lack num_batches_tracked); a file without any gets the model's own.
    usable._metadata = getattr(state, "_metadata", None) or getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    try:
        # not strict: missing and unexpected keys are judged below, after modules renamed old keys
        result = model.load_state_dict(usable, strict=False)
    except RuntimeError as exc:
        raise FailedPrecondition(f"{where} do not fit the architecture: {str(exc).strip()[:500]}") from exc
    missing = [
        k for k in result.missing_keys if not k.startswith(heads) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(_AUX_PREFIXES + heads)]
    _refuse_if(missing, "missing", where)
    _refuse_if(unexpected, "unexpected", where)
    log.info("loaded %d tensors of %s", len(usable), where)


def _refuse_if(keys: list[str], problem: str, where: str) -> None:
    if keys:
        raise FailedPrecondition(
            f"{where} do not fit the architecture: {len(keys)} tensors {problem}, first {keys[0]}; "
            "the file must be a state_dict of this exact architecture"
        )


def convert_lite0_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the EfficientNet-Lite0 package's tensors to timm's `tf_efficientnet_lite0` (`target`).

    The two state_dicts hold the same tensors in the same order under different names, so they are
    mapped by position; every shape is checked so a different package version fails loudly. Shapes
    cannot tell timm's two Lite0 networks apart: which one `target` is decides whether the tensors
    mean what TensorFlow trained (tf_efficientnet_lite0) or not (efficientnet_lite0).
    """
    if len(source) != len(target):
        raise FailedPrecondition(
            f"the EfficientNet-Lite0 weights have {len(source)} tensors, timm's {registry.LITE0} has "
            f"{len(target)}; reinstall {registry.LITE0_PACKAGE}"
        )
    converted = {}
    for index, ((src_key, src), (dst_key, dst)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if src.shape != dst.shape:
            raise FailedPrecondition(
                f"the EfficientNet-Lite0 weights do not map onto timm's {registry.LITE0}: tensor #{index} "
                f"{src_key} {tuple(src.shape)} vs {dst_key} {tuple(dst.shape)}; "
                f"reinstall {registry.LITE0_PACKAGE}"
            )
        converted[dst_key] = src
    return converted


def _torchvision_member(architecture: str, name: str) -> torchvision.models.WeightsEnum:
    enum = _weights_enum(architecture)
    try:
        return enum[name]  # type: ignore[no-any-return,index]
    except KeyError:
        valid = [DEFAULT, *(m.name for m in enum), NONE, FILE]  # type: ignore[attr-defined]
        raise InvalidArgument(
            f"model.weights {name!r} is unknown for {architecture}; allowed: {', '.join(valid)}"
        ) from None


@functools.cache
def _weights_enum(architecture: str) -> Any:
    # torchvision finds the enum through the builder's signature (inspect.signature, ~0.1 ms a call)
    return torchvision.models.get_model_weights(architecture)


def _read_file(path: Path) -> dict[str, Any]:
    loaded: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated file, not a weights file at all
        raise FailedPrecondition(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise FailedPrecondition(f"weights file {path} holds a {type(loaded).__name__}, not a state_dict")
    return loaded  # as loaded: an OrderedDict keeps its _metadata


def _read_user_file(path: Path) -> dict[str, torch.Tensor]:
    loaded = _read_file(path)
    # a training checkpoint wraps the state_dict; DistributedDataParallel prefixes every key with `module.`
    for key in ("state_dict", "model"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise FailedPrecondition(
            f"weights file {path} is not a state_dict: expected a mapping of tensors, "
            "or a dict with one under 'state_dict' or 'model'"
        )
    if all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return loaded


def _torch_home_of(file: Path | None) -> str:
    # <torch_home>/hub/checkpoints/<file>: the user sets TORCH_HOME, not the checkpoints folder
    return str(file.parent.parent.parent) if file is not None else "?"
