"""The model store: the folder of archives, and the one rule for a model's next version.

The rule: a model's next version is one more than the highest version of that model in the store
("1" for a new model). The store is the only place asked: it is where every archive that was ever
packaged lives (served or not), it is all a worker process can see (no TorchServe, no job store), and
the archiver never replaces a file there, so two packagers that pick the same number find out and
pick again. A gap (versions 1 and 3 left) gives 4: a number is never reused below the highest, so a
version deleted from the store does not come back as a different model. Only files named for that
model count (`<model>-v<N>.mar`, or `<model>-v<N>.<M>...mar` counted by N); anything else in the
folder is ignored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from service.packaging.archiver import build_archive
from service.packaging.mar_files import read_manifest, sha256_of
from service.serving_types import Archive
from service.settings import Settings

log = logging.getLogger(__name__)

PACKAGE_ATTEMPTS = 5  # packagers racing for one model: each lost race moves on to the next number


class ModelStore:
    """Archives in settings.model_store: package a checkpoint as the next version; check an archive."""

    def __init__(self, settings: Settings) -> None:
        self.folder = settings.model_store
        self.max_image_pixels = settings.max_image_pixels

    def package(self, checkpoint: Path, model_name: str) -> Archive:
        """Build the checkpoint's archive as the model's next version (see the module docstring)."""
        for attempt in range(1, PACKAGE_ATTEMPTS + 1):
            version = self.next_version(model_name)
            try:
                return build_archive(
                    checkpoint, self.folder, model_name, version, max_image_pixels=self.max_image_pixels
                )
            except AlreadyExists:
                log.info("version %s of %s was taken while packaging (try %d)", version, model_name, attempt)
        raise AlreadyExists(
            f"could not package model {model_name!r}: another packager took each version tried "
            f"({PACKAGE_ATTEMPTS} tries); package the job again"
        )

    def next_version(self, model_name: str) -> str:
        """One more than the highest version of `model_name` in the store ("1" for a new model)."""
        pattern = re.compile(rf"^{re.escape(model_name)}-v(\d+)(\.\d+)*\.mar$")
        taken = [int(m.group(1)) for p in self.folder.glob("*.mar") if (m := pattern.match(p.name))]
        return str(max(taken, default=0) + 1)

    def archive(self, model_name: str, version: str) -> Archive:
        """Version `version` of `model_name` in the store; NotFound naming the versions there."""
        path = self.folder / f"{model_name}-v{version}.mar"
        if not version or not path.is_file():
            pattern = re.compile(rf"^{re.escape(model_name)}-v(\d+(?:\.\d+)*)\.mar$")
            present = sorted(m.group(1) for p in self.folder.glob("*.mar") if (m := pattern.match(p.name)))
            raise NotFound(
                f"model {model_name!r} has no version {version!r} in the model store; it has "
                f"{', '.join(present) or 'none'}"
            )
        name, found = read_manifest(path)
        return Archive(path=path.resolve(), sha256=sha256_of(path), name=name, version=found)

    def verified(self, path: Path, sha256: str) -> Archive:
        """The archive at `path`, checked: in this store, present, and unchanged since it was packaged
        (`sha256`); its name and version read from its manifest."""
        resolved = path.resolve()
        if resolved.parent != self.folder.resolve():
            raise InvalidArgument(f"archive {path} is not in the model store {self.folder}")
        if not resolved.is_file():
            raise NotFound(f"archive {path} does not exist; package the job again")
        actual = sha256_of(resolved)
        if actual != sha256:
            raise FailedPrecondition(
                f"archive {resolved.name} has SHA-256 {actual}, but {sha256} was recorded when it was "
                "packaged: it changed since; package the job again"
            )
        name, version = read_manifest(resolved)
        return Archive(path=resolved, sha256=sha256, name=name, version=version)
