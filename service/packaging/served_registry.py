"""Served models: the registry of what TorchServe serves (the records the gRPC layer translates are
service.serving_types's, which this package implements).

TorchServe forgets everything when it restarts (we run it without config snapshots), so this JSON
file, rewritten atomically on every change, is what the service re-registers from.

Several processes may share one file: control-plane replicas on one PostgreSQL share the state volume
and so the served models (each runs its own TorchServe, which follows the file: versions.py). A change
is a read-modify-write under an exclusive `flock` on a lock file beside it, so two replicas promoting
at once both land; a read re-reads the file when it was replaced since (a new inode each time).
`flock` holds across processes on one machine and, on NFSv4 and CephFS, across nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from service.errors import NotFound

REGISTRY_VERSION = 1


@dataclass(frozen=True)
class ServedVersion:
    version: str
    job_id: str
    archive: str  # file name in the model store
    sha256: str
    checkpoint: str
    batch_size: int
    max_batch_delay_ms: int
    workers: int
    top_k: int
    served_at: float


@dataclass(frozen=True)
class ServedEntry:
    name: str
    default: str
    versions: dict[str, ServedVersion] = field(default_factory=dict)

    def ordered_versions(self) -> list[str]:
        return sorted(self.versions, key=version_key)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class ServedRegistry:
    """name -> versions, job ids, SHA-256s and the default version; thread- and process-safe, persisted
    on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None  # the file's inode, size and mtime when read
        self._entries: dict[str, ServedEntry] = {}
        self._refresh()

    def get(self, name: str) -> ServedEntry | None:
        with self._lock:
            self._refresh()
            return self._entries.get(name)

    def entries(self) -> list[ServedEntry]:
        with self._lock:
            self._refresh()
            return [self._entries[name] for name in sorted(self._entries)]

    def add(self, name: str, served: ServedVersion, make_default: bool) -> ServedEntry:
        with self._changing():
            entry = self._entries.get(name) or ServedEntry(name=name, default=served.version)
            versions = {**entry.versions, served.version: served}
            entry = replace(
                entry, versions=versions, default=served.version if make_default else entry.default
            )
            self._entries[name] = entry
            self._save()
            return entry

    def set_default(self, name: str, version: str) -> ServedEntry:
        with self._changing():
            entry = self._entries.get(name)
            if entry is None or version not in entry.versions:  # another replica unserved it just now
                have = ", ".join(entry.ordered_versions()) if entry is not None else "none: not served"
                raise NotFound(f"model {name!r} has no version {version!r} (versions: {have})")
            entry = replace(entry, default=version)
            self._entries[name] = entry
            self._save()
            return entry

    def remove(self, name: str, version: str | None = None) -> ServedEntry | None:
        """Forget one version (or every version); returns what remains of the model, if anything."""
        with self._changing():
            entry = self._entries.get(name)
            if entry is None:  # another process removed it first
                return None
            versions = {} if version is None else {v: s for v, s in entry.versions.items() if v != version}
            if not versions:
                del self._entries[name]
                self._save()
                return None
            default = entry.default if entry.default in versions else max(versions, key=version_key)
            self._entries[name] = replace(entry, versions=versions, default=default)
            self._save()
            return self._entries[name]

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """This thread and this process alone change the file, starting from what it holds now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            # the file lock first: a read in this process (a Predict) never waits behind another process
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, and if the process dies
            with self._lock:
                # Always read again: on a network filesystem a cached stat may not show another node's
                # change yet. No stamp until _save: a change that fails leaves memory to be re-read.
                self._entries, self._stamp = self._load(), None
                yield

    def _refresh(self) -> None:
        stamp = _stamp_of(self.path)
        if stamp is None:
            self._stamp, self._entries = None, {}
            return
        if stamp != self._stamp:
            self._entries, self._stamp = self._load(), stamp

    def _load(self) -> dict[str, ServedEntry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        entries = {}
        for name, raw in data.get("models", {}).items():
            versions = {v: ServedVersion(**s) for v, s in raw["versions"].items()}
            entries[name] = ServedEntry(name=name, default=raw["default"], versions=versions)
        return entries

    def _save(self) -> None:
        data: dict[str, Any] = {
            "registry_version": REGISTRY_VERSION,
            "models": {
                name: {"default": e.default, "versions": {v: asdict(s) for v, s in e.versions.items()}}
                for name, e in self._entries.items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._stamp = _stamp_of(self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _stamp_of(path: Path) -> tuple[int, int, int] | None:
    """The file's inode, size and mtime: any write through _save changes one (a new inode at least);
    None when there is no file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)
