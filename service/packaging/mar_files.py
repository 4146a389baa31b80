"""Reading a built TorchServe archive (.mar): its SHA-256 and the name and version in its manifest.

Standard library only, apart from the domain errors: the serving replica's process reads archives
and must never import torch, which building one (service.packaging.archiver) does.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from service.errors import FailedPrecondition


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(archive: Path) -> tuple[str, str]:
    """(model name, version) from an archive's MAR-INF/MANIFEST.json; FailedPrecondition if unreadable."""
    try:
        with zipfile.ZipFile(archive) as mar:
            model = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        raise FailedPrecondition(
            f"{archive} is not a readable TorchServe archive ({exc}); package it again"
        ) from None
