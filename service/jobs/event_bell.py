"""Tells watchers in this process that a job has new events, so WatchJob streams wait instead of polling.

Every writer of events in the control plane (the API, the scheduler, the intake of workers' reports)
goes through the one JobStore of this process, which rings the job's bell after its transaction has
committed. A watcher reads the database only when its job's bell rang (or, as a safety net for writes
this process cannot hear, such as another replica's on a shared PostgreSQL, after `fallback_s`).
"""

from __future__ import annotations

import threading


class EventBell:
    """A version number per job, bumped by `ring`, waited on by `wait`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._versions: dict[str, int] = {}

    def version(self, job_id: str) -> int:
        with self._cond:
            return self._versions.get(job_id, 0)

    def ring(self, job_id: str) -> None:
        with self._cond:
            self._versions[job_id] = self._versions.get(job_id, 0) + 1
            self._cond.notify_all()

    def wait(self, job_id: str, seen: int, timeout: float) -> int:
        """Wait until the job's version differs from `seen` or `timeout` passes; the version now."""
        with self._cond:
            self._cond.wait_for(lambda: self._versions.get(job_id, 0) != seen, timeout)
            return self._versions.get(job_id, 0)

    def wake_all(self) -> None:
        """Wake every waiter without news (a watcher that went away re-checks its stop flag)."""
        with self._cond:
            self._cond.notify_all()
