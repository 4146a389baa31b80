"""Keeps TorchServe running: start, a watchdog that restarts it when it dies, and availability.

TorchServe forgets its models when it restarts, so whoever starts the supervisor hands it `restore`
(register every served version again), called after each start while it runs alone (ServingLock). While
TorchServe is down or being restored, `require_running` raises Unavailable and availability listeners
(the gRPC health service) hear `False`; they hear `True` once every version is registered again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.errors import Unavailable
from service.packaging.serving_lock import ServingLock
from service.packaging.torchserve_process import TorchServeProcess

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 2.0


class TorchServeSupervisor:
    """One TorchServe process, watched; `lock` orders everything that changes what it serves."""

    def __init__(self, process: TorchServeProcess, *, enabled: bool = True) -> None:
        self.process = process
        self.enabled = enabled  # TUNESERVE_TORCHSERVE_ENABLED: when false, never started
        # A deploy never interleaves with a restart's restore, nor with another change to its model.
        self.lock = ServingLock()
        self.restarts = 0
        self._restore: Callable[[], None] = lambda: None
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._available = threading.Event()  # TorchServe is up and every served version is registered
        self._listeners: list[Callable[[bool], None]] = []

    def start(self, restore: Callable[[], None]) -> None:
        """Start TorchServe, run `restore`, and watch the process (running `restore` after each restart)."""
        self._restore = restore
        self._stopping.clear()
        with self.lock.alone():
            self.process.start()
            restore()
        self._set_available(True)
        self._watchdog = threading.Thread(target=self._watch, name="torchserve-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        self._set_available(False)
        if self._watchdog is not None:
            self._watchdog.join(timeout=30)
            self._watchdog = None
        with self.lock.alone():
            self.process.stop()

    def is_running(self) -> bool:
        return self.process.is_running()

    def alive(self) -> bool:
        """Running and answering /ping."""
        return self.process.is_running() and self.process.ping()

    def require_running(self) -> None:
        if not self.enabled:
            raise Unavailable("serving is off (TUNESERVE_TORCHSERVE_ENABLED=false)")
        if not self.process.is_running() or not self._available.is_set():
            raise Unavailable("TorchServe is not running (starting or restarting); retry in a few seconds")

    def on_availability(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(available)` now and whenever TorchServe goes down or is back with its models."""
        self._listeners.append(listener)
        listener(self._available.is_set())

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.wait(WATCH_INTERVAL_S * (1 + min(failures, 15))):
            if self.process.is_running():
                failures = 0
                self.process.keep_warm()
                continue
            self._set_available(False)  # before the lock: predictions fail fast while we restart
            with self.lock.alone():
                if self._stopping.is_set():
                    return
                log.error("TorchServe died; restarting it. Its last output: %s", self.process.log_tail())
                try:
                    self.process.restart()
                    self._restore()
                    self._set_available(True)  # before the count: whoever waits on it may predict at once
                    self.restarts += 1
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("TorchServe restart failed (%d in a row)", failures)

    def _set_available(self, available: bool) -> None:
        if available == self._available.is_set():
            return
        if available:
            self._available.set()
        else:
            self._available.clear()
        log.info("serving is %s", "available" if available else "unavailable")
        for listener in self._listeners:
            try:
                listener(available)
            except Exception:  # a listener must not stop the watchdog
                log.exception("availability listener failed")
