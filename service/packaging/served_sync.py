"""One TorchServe brought to what a registry serves: what it holds, and the plan that changes it.

Two callers follow a registry they do not alone write: a control-plane replica (the served registry
is shared by every replica on one state volume; another replica promotes or unserves a version) and
a serving replica (the control plane's registry, read-only). Both carry out the same plan with their
own TorchServe: register the versions it lacks (each ready before it can become the default), move
the defaults, unregister what is no longer served, a model's default version last (TorchServe keeps
a model's default while the model has other versions).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from service.packaging.served_registry import ServedEntry, ServedVersion, version_key


class Versions(Protocol):
    """A model's versions and its default, as a registry or a TorchServe holds them."""

    @property
    def default(self) -> str: ...

    @property
    def versions(self) -> Collection[str]: ...


@dataclass(frozen=True)
class ModelPlan:
    name: str
    register: tuple[ServedVersion, ...] = ()  # in version order
    default: str | None = None  # made the default once it is registered (None: it already is)


@dataclass(frozen=True)
class SyncPlan:
    # model by model: one model's rollback never waits for another model's new version to load
    models: tuple[ModelPlan, ...] = ()
    unregister: tuple[tuple[str, str], ...] = ()  # last; a model's default version after its others

    def __bool__(self) -> bool:
        return bool(self.models or self.unregister)


def plan_sync(wanted: Mapping[str, ServedEntry], have: Mapping[str, Versions]) -> SyncPlan:
    """What takes a TorchServe holding `have` to serving `wanted`."""
    models = []
    for name, entry in sorted(wanted.items()):
        held = have.get(name)
        register = tuple(
            entry.versions[v] for v in entry.ordered_versions() if held is None or v not in held.versions
        )
        default = entry.default if held is None or held.default != entry.default else None
        if register or default is not None:
            models.append(ModelPlan(name, register, default))
    unregister = []
    for name, held in sorted(have.items()):
        keep = wanted[name].versions if name in wanted else {}
        doomed = sorted((v for v in held.versions if v not in keep), key=version_key)
        unregister += [(name, v) for v in sorted(doomed, key=lambda v: v == held.default)]
    return SyncPlan(tuple(models), tuple(unregister))


@dataclass(frozen=True)
class Held:
    default: str
    versions: frozenset[str] = field(default_factory=frozenset)


class HeldVersions:
    """What one TorchServe has registered, by this process's own calls (TorchServe forgets everything
    when it restarts: `clear`, then register again). Thread-safe: health reads it without the lock
    that serialises the changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Held] = {}

    def snapshot(self) -> dict[str, Held]:
        with self._lock:
            return dict(self._models)

    def get(self, name: str) -> Held | None:
        with self._lock:
            return self._models.get(name)

    def holds(self, name: str, version: str | None = None) -> bool:
        """This TorchServe has the model (that version of it, when given) registered."""
        held = self.get(name)
        return held is not None and (version is None or version in held.versions)

    def registered(self, name: str, version: str) -> None:
        """A version is registered: a model's first one is its default (TorchServe's rule)."""
        with self._lock:
            held = self._models.get(name) or Held(default=version)
            self._models[name] = Held(held.default, held.versions | {version})

    def made_default(self, name: str, version: str) -> None:
        with self._lock:
            held = self._models.get(name)
            if held is not None and version in held.versions:
                self._models[name] = Held(version, held.versions)

    def unregistered(self, name: str, version: str) -> None:
        with self._lock:
            held = self._models.get(name)
            if held is None:
                return
            versions = held.versions - {version}
            if not versions:
                del self._models[name]
                return
            default = held.default if held.default in versions else max(versions, key=version_key)
            self._models[name] = Held(default, versions)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
