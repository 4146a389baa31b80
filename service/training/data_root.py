"""Paths under the data root: a dataset path that leaves it (by `..` or a symlink) is refused.

Also `printable`: file names that are not UTF-8 become text for events and errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from service.errors import DatasetError


def printable(path: str | Path) -> str:
    """`path` as UTF-8 text: the bytes of a name that is not UTF-8 become `\\xNN` (events need text)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def resolve_under_root(path: str | Path, data_root: Path, field: str = "data.path") -> Path:
    """`path` (relative to the data root, or absolute) with symlinks and `..` resolved; must stay inside."""
    root = data_root.resolve()
    try:
        resolved = (root / path).resolve()
        resolved.exists()  # raises for a name the OS cannot look up (too long), not for a missing one
    except (OSError, ValueError) as exc:  # ValueError: a NUL character
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DatasetError(
            f"{field} {str(path)[:200]!r} is not a usable path ({reason}); give a folder path relative to "
            "the data root, of printable characters and at most 255 per name"
        ) from None
    if not resolved.is_relative_to(root):
        raise DatasetError(
            # where a symlink leads is not the caller's to learn, only that it leaves the root
            f"{field} {str(path)[:200]!r} is outside the data root {root} (after `..` and symlinks); "
            "put the dataset under the data root and give its path relative to it"
        )
    return resolved
