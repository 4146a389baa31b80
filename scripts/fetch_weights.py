"""Download pretrained weights into the local cache the service reads them from (needs internet).

    usage: scripts/fetch_weights.py resnet18,mobilenet_v3_small,resnet50:IMAGENET1K_V2,timm/convnext_atto
    (or `make weights MODELS=...`). The cache is TUNESERVE_TORCH_HOME, else TORCH_HOME, else
    ~/.cache/torch, or --torch-home. On an offline machine, copy the files this prints afterwards.

torchvision weights go where torchvision looks: <torch_home>/hub/checkpoints/<file of the URL>.
timm weights are downloaded by timm (Hugging Face hub) and saved as a state_dict under
<torch_home>/hub/checkpoints/timm/<name>.safetensors. The builtin tf_efficientnet_lite0 (alias
efficientnet_lite0) ships in a Python package.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import urllib.error
from pathlib import Path

log = logging.getLogger("fetch_weights")
_HOSTS = ("download.pytorch.org", "huggingface.co")  # torchvision's and timm's weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", help="ARCH[:WEIGHTS], comma- or space-separated")
    parser.add_argument("--torch-home", type=Path, default=None, help="default: the service's torch_home")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    requested = [m for item in args.models for m in item.split(",") if m.strip()]
    if not requested:
        parser.error("name at least one model, e.g. `make weights MODELS=resnet18,timm/convnext_atto`")
    torch_home = args.torch_home or _service_torch_home()
    failures = 0
    online: bool | None = None  # asked once, and only when something has to be downloaded
    for item in requested:
        try:
            path = cached(item.strip(), torch_home)
            if path is None:
                online = _online() if online is None else online
                if not online:
                    failures += 1
                    log.error(
                        "%s: this machine is offline (cannot resolve %s): run `make weights MODELS=%s` on a "
                        "machine with internet, then copy its $TORCH_HOME/hub/checkpoints folder to "
                        "%s/hub/checkpoints here",
                        item, " / ".join(_HOSTS), item, torch_home,
                    )  # fmt: skip
                    continue
                path = fetch(item.strip(), torch_home)
        except Exception as exc:  # report every model, then fail once
            failures += 1
            log.error("%s: %s", item, _explain(exc))
        else:
            log.info("%s -> %s", item, path)
    return 1 if failures else 0


def cached(item: str, torch_home: Path) -> Path | None:
    """The file of ARCH[:WEIGHTS] when it is already where the service reads it (e.g. the bundled
    EfficientNet-Lite0), else None."""
    from service.spec import ModelSpec
    from service.training import registry, weights

    arch, _, name = item.partition(":")
    spec = ModelSpec(architecture=arch, weights=name or registry.DEFAULT, weights_file=None)
    resolved = weights.resolve_weights(spec, torch_home, require_file=False)
    return resolved.file if resolved.file is not None and resolved.file.is_file() else None


def fetch(item: str, torch_home: Path) -> Path:
    """Download one ARCH[:WEIGHTS] into torch_home; returns the file written (or already there)."""
    from service.spec import ModelSpec
    from service.training import registry, weights

    arch, _, name = item.partition(":")
    spec = ModelSpec(architecture=arch, weights=name or registry.DEFAULT, weights_file=None)
    resolved = weights.resolve_weights(spec, torch_home, require_file=False)
    assert resolved.file is not None
    if resolved.file.is_file():
        return resolved.file
    if resolved.source == "builtin":
        raise RuntimeError(f"bundled with a Python package: `{registry.fetch_command(arch)}`")
    if resolved.torchvision_weights is not None:
        resolved.torchvision_weights.get_state_dict(
            model_dir=str(resolved.file.parent), progress=True, check_hash=True
        )
        return resolved.file
    return _fetch_timm(arch.removeprefix(registry.TIMM_PREFIX), resolved.file)


def _fetch_timm(name: str, path: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(name, pretrained=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)  # never leave a half-written file where the service looks
    return path


def _online() -> bool:
    # Behind a proxy the proxy resolves names: let the download itself decide.
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        for host in _HOSTS:
            socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _explain(exc: Exception) -> str:
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return f"download failed ({exc}); copy the file from a machine with internet instead"
    return str(exc)


def _service_torch_home() -> Path:
    from service.settings import Settings

    return Settings().torch_home


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
