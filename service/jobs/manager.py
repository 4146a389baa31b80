"""The jobs side of the API, in domain terms: create (admit, then queue), read, list, cancel, watch.

The gRPC servicer translates to and from these calls and holds no logic of its own. Every call names its
caller (service.access.clients.Client): a job belongs to the client that created it, and a client that is
not its owner nor an admin is told it does not exist, in the same words as a job that does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from service.access.clients import Client
from service.devices import with_resolved_gpus
from service.errors import AlreadyExists, ResourceExhausted
from service.jobs.store import JobStore
from service.jobs.store_owners import OwnerLimits
from service.jobs.store_rows import job_not_found
from service.jobs.watch import FALLBACK_S, follow_events
from service.records import EventKind, Job, JobEvent, JobState
from service.settings import Settings
from service.spec import JobSpec
from service.training_imports import import_training_modules

Admit = Callable[[JobSpec, Settings], Any]


def _admit(spec: JobSpec, settings: Settings) -> Any:
    import_training_modules()  # never beside the start-up import in another thread: see the module
    from service.jobs.admission import admit

    return admit(spec, settings)


class JobManager:
    """Jobs for the API: `wake` tells the scheduler that there is something new to look at."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        *,
        wake: Callable[[], None] = lambda: None,
        admit: Admit = _admit,
        max_watchers: int | None = None,
        watch_fallback_s: float = FALLBACK_S,
    ) -> None:
        self.settings = settings
        self.store = store
        self._wake = wake
        self._admit = admit
        # every WatchJob holds a server thread for as long as it streams: keep some threads for the rest
        self._watchers = threading.BoundedSemaphore(max_watchers or max(1, settings.grpc_workers - 4))
        self._watch_fallback_s = watch_fallback_s
        self._open_watches: set[threading.Event] = set()
        self._lock = threading.Lock()

    def create(self, spec: JobSpec, caller: Client, idempotency_key: str | None = None) -> Job:
        """Admit and queue a job for `caller`; a repeated idempotency key returns its job without
        re-checking (another client's key is refused without naming its job)."""
        # first: the stored spec records the resolved GPU count, and a repeated request must match it
        spec = with_resolved_gpus(spec, self.settings)
        if idempotency_key:
            existing = self.store.job_for_key(idempotency_key)
            if existing is not None:
                if not caller.sees(existing.owner):
                    raise AlreadyExists(
                        f"idempotency_key {idempotency_key[:40]!r} is already taken; use a new key (a UUID "
                        "works well)"
                    )
                return self.store.create_job(spec, idempotency_key)  # the same job, or AlreadyExists
        admitted = self._admit(spec, self.settings)
        job = self.store.create_job(
            spec,
            idempotency_key,
            max_queued=self.settings.max_queued_jobs,
            notes=_admission_notes(admitted),
            owner=_owner(caller),
        )
        self._wake()
        return job

    def get(self, job_id: str, caller: Client) -> Job:
        job = self.store.get_job(job_id)
        if not caller.sees(job.owner):
            raise job_not_found(job_id)
        return job

    def list(
        self, states: Iterable[JobState], page_size: int, page_token: str, caller: Client
    ) -> tuple[list[Job], str]:
        """The caller's jobs (an admin's: everyone's), newest first."""
        owner = None if caller.is_admin else caller.name
        return self.store.list_jobs(states, page_size, page_token, owner=owner)

    def cancel(self, job_id: str, caller: Client) -> Job:
        self.get(job_id, caller)
        job = self.store.request_cancel(job_id)
        self._wake()
        return job

    def watch(
        self, job_id: str, after_seq: int, stop: threading.Event, caller: Client
    ) -> Iterator[tuple[JobEvent, JobState]]:
        """Events after `after_seq` until the job ends, the watcher leaves (`stop` is set) or close()."""
        self.get(job_id, caller)
        with self._watch_slot(stop):
            yield from follow_events(
                self.store, job_id, after_seq, stop=stop, fallback_s=self._watch_fallback_s
            )

    def open_watches(self) -> int:
        """How many WatchJob streams are open now."""
        with self._lock:
            return len(self._open_watches)

    def close(self) -> None:
        """End every open watch (the server is stopping)."""
        with self._lock:
            for stop in self._open_watches:
                stop.set()
        self.store.bell.wake_all()

    @contextmanager
    def _watch_slot(self, stop: threading.Event) -> Iterator[None]:
        if not self._watchers.acquire(blocking=False):
            raise ResourceExhausted(
                "too many WatchJob streams are open on this server; close some, poll GetJob instead, "
                "or raise TUNESERVE_GRPC_WORKERS"
            )
        with self._lock:
            self._open_watches.add(stop)
        try:
            yield
        finally:
            with self._lock:
                self._open_watches.discard(stop)
            self._watchers.release()


def _owner(caller: Client) -> OwnerLimits | None:
    """What a new job records as its owner, with that client's limits (None: no authentication)."""
    if not caller.name:
        return None
    return OwnerLimits(caller.name, caller.max_queued, caller.max_running)


def _admission_notes(admitted: Any) -> list[tuple[EventKind, str, dict[str, Any]]]:
    """The events that tell a watcher what admission found: classes, images, parameters, warnings."""
    description = getattr(admitted, "description", None)
    if description is None:
        return []
    class_names = list(admitted.class_names)
    data = {
        "class_names": class_names,
        "num_images": admitted.num_images,
        "image_size": description.image_size,
        "total_params": description.total_params,
        "trainable_params": description.trainable_params,
        "frozen_params": description.frozen_params,
    }
    message = (
        f"admitted: {len(class_names)} classes, {admitted.num_images} images, "
        f"{description.trainable_params:,} of {description.total_params:,} parameters trainable"
    )
    notes: list[tuple[EventKind, str, dict[str, Any]]] = [(EventKind.INFO, message, data)]
    notes += [(EventKind.WARNING, warning, {}) for warning in admitted.warnings]
    return notes
