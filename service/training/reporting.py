"""How the engine tells the outside world what is happening, without knowing who listens.

The worker process implements Reporter on top of the job store; tests use CollectingReporter.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.records import EventKind


class Reporter(Protocol):
    def event(self, kind: EventKind, message: str, data: dict[str, Any] | None = None) -> None:
        """Record one job event (appended to the job's ordered event log)."""

    def result(self, **fields: Any) -> None:
        """Merge fields into the job's JobResult (see service.records.JobResult)."""

    def stop_requested(self) -> str | None:
        """A reason ("cancelled", "draining") once the job must stop at the next safe point, else None."""


@dataclass
class CollectingReporter:
    """Keeps everything in memory; for tests and for in-process runs."""

    events: list[tuple[EventKind, str, dict[str, Any]]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, kind: EventKind, message: str, data: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.events.append((kind, message, dict(data or {})))

    def result(self, **fields: Any) -> None:
        with self._lock:
            self.fields.update(fields)

    def stop_requested(self) -> str | None:
        return self.stop_reason

    def kinds(self) -> list[EventKind]:
        return [k for k, _, _ in self.events]
