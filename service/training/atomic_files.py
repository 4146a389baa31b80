"""Files that appear whole or not at all: write to a temporary name next to the target, fsync, rename.

A crash or a full disk mid-write leaves the previous file intact and, at worst, a temporary file that
matches PARTIAL_FILE (service.training.checkpoints.discard_partial_writes removes those).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from service.errors import ResourceExhausted

PARTIAL_FILE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # what atomic_target writes before the rename


class WriteRecorder:
    """A file for torch.save that remembers the OSError of a failed write (e.g. ENOSPC)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def publish_copy(source: Path, target: Path) -> None:
    """Atomically make `target` a copy of `source`: a hard link when possible, else a byte copy."""
    if target.exists() and os.path.samefile(source, target):
        # already linked (publish() on resume): rename(2) of one link onto another of the same file
        # does nothing and would leave the temporary link behind
        return
    with atomic_target(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links on this filesystem (or across devices)
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
                dst.flush()
                os.fsync(dst.fileno())


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it onto `path`, on failure remove it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # same folder: os.replace stays atomic
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(
                f"no space left to write checkpoint {path} ({exc.strerror}); the previous checkpoints are "
                f"intact. Free space on the volume holding {path.parent}, then retry the job to resume"
            ) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; some platforms cannot open a directory, which is fine
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
