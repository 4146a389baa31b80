"""What a serving replica serves: the control plane's served versions, or else every archive in the store.

A replica (`tuneserve serve --serving-only`) shares the control plane's model store, read-only. Which
versions it registers is decided once, at start:
- when the control plane's served registry is readable (`<store>/../torchserve/served_models.json`,
  where the control plane keeps it on the shared state volume), exactly the versions it serves, with
  their batching, top-k and default version: a version the promotion gate refused is in the store but
  not in that registry, so a replica never serves it;
- otherwise (an exported folder's `model-store/`, or archives copied by hand) every archive in the
  store, grouped by the model name in its manifest, the highest version the default, batching as a
  job spec's defaults.
A replica started with a sync interval asks again at that interval and serves what changed
(service.packaging.serving_only.ServingReplica.sync); one without, when it restarts.

Only the standard library and the registry's records: the replica's process never imports torch
(service.packaging.archiver does; the archive readers come from the torch-free mar_files).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from service.errors import FailedPrecondition
from service.packaging.mar_files import read_manifest, sha256_of
from service.packaging.served_registry import ServedEntry, ServedRegistry, ServedVersion, version_key
from service.spec import ServingSpec

log = logging.getLogger(__name__)

CONTROL_PLANE_REGISTRY = Path("torchserve") / "served_models.json"  # relative to the store's parent


@dataclass(frozen=True)
class ReplicaModels:
    """The versions a replica registers, and where that choice came from (for its logs)."""

    entries: tuple[ServedEntry, ...]
    source: str


def control_plane_registry(model_store: Path) -> Path:
    """Where the control plane that owns `model_store` keeps its served registry."""
    return model_store.resolve().parent / CONTROL_PLANE_REGISTRY


def choose_models(model_store: Path) -> ReplicaModels:
    """The control plane's served versions when its registry is there, else every archive in the store."""
    if not model_store.is_dir():
        raise FailedPrecondition(
            f"model store {model_store} is not a folder; mount the shared model store there or set "
            "TUNESERVE_MODEL_STORE_DIR (--model-store) to it"
        )
    registry = control_plane_registry(model_store)
    if registry.is_file():
        entries = tuple(_present(ServedRegistry(registry).entries(), model_store))
        return ReplicaModels(entries, f"the control plane's served models ({registry})")
    return ReplicaModels(tuple(_from_archives(model_store)), f"every archive in {model_store}")


def write_registry(models: ReplicaModels, path: Path) -> ServedRegistry:
    """The replica's own registry at `path`, replaced by `models` (TorchServeBackend restores from it)."""
    path.unlink(missing_ok=True)
    registry = ServedRegistry(path)
    for entry in models.entries:
        for version in entry.ordered_versions():
            registry.add(entry.name, entry.versions[version], make_default=False)
        registry.set_default(entry.name, entry.default)
    return registry


def _present(entries: list[ServedEntry], model_store: Path) -> list[ServedEntry]:
    """Entries whose archives are in the store unchanged (the control plane's registry may name one
    deleted or replaced since)."""
    kept = []
    for entry in entries:
        versions = {v: s for v, s in entry.versions.items() if _unchanged(model_store / s.archive, s.sha256)}
        for missing in sorted(set(entry.versions) - set(versions), key=version_key):
            log.warning(
                "%s version %s: %s is not in %s as the control plane served it (gone, or its SHA-256 "
                "differs); not served", entry.name, missing, entry.versions[missing].archive, model_store,
            )  # fmt: skip
        if versions:
            default = entry.default if entry.default in versions else max(versions, key=version_key)
            kept.append(ServedEntry(entry.name, default, versions))
    return kept


def _from_archives(model_store: Path) -> list[ServedEntry]:
    defaults = ServingSpec()
    by_name: dict[str, dict[str, ServedVersion]] = {}
    for path in sorted(model_store.glob("*.mar")):
        try:
            name, version = read_manifest(path)
            version_key(version)  # TorchServe's and our version rule: dotted numbers
        except (FailedPrecondition, ValueError) as exc:
            log.warning("%s is skipped: not a readable TorchServe archive (%s)", path.name, exc)
            continue
        if version in by_name.get(name, {}):
            log.warning("%s is skipped: %s version %s is already %s", path.name, name, version,
                        by_name[name][version].archive)  # fmt: skip
            continue
        by_name.setdefault(name, {})[version] = ServedVersion(
            version=version, job_id="", archive=path.name, sha256=sha256_of(path), checkpoint="",
            batch_size=defaults.batch_size, max_batch_delay_ms=defaults.max_batch_delay_ms,
            workers=defaults.workers, top_k=defaults.top_k, served_at=path.stat().st_mtime,
        )  # fmt: skip
    return [ServedEntry(n, max(v, key=version_key), v) for n, v in sorted(by_name.items())]


def _unchanged(path: Path, sha256: str) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    return _cached_sha256(str(path), stat.st_mtime_ns, stat.st_size) == sha256


@functools.lru_cache(maxsize=1024)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    # a replica that follows the store looks every few seconds: hash an archive once, not each time
    return sha256_of(Path(path))
