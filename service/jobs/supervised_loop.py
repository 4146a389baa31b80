"""A polling loop on a thread of its own that a health probe can bring back when it dies.

`tick` runs every `poll_s`, or at once after wake(). A tick that raises (a busy database, a full disk) is
logged and the loop goes on; a thread that dies anyway (an error outside the tick, a kill) is restarted
by the next healthy() call, which answers False until the new thread has completed a tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class SupervisedLoop:
    def __init__(self, name: str, tick: Callable[[], None], poll_s: float) -> None:
        self.name = name
        self._tick = tick
        self._poll_s = poll_s
        self._wake = threading.Event()
        self._soon_s: float | None = None  # the next wait only, when shorter than poll_s
        self._stopping = threading.Event()
        self._supervise = threading.Lock()
        self._last_tick_ok = False  # the thread's last tick ran through (reset when it is restarted)
        self.thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._last_tick_ok = False
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """Tick now rather than at the next poll."""
        self._wake.set()

    def soon(self, delay_s: float) -> None:
        """From the tick: tick again within `delay_s` (for something that rings no wake())."""
        self._soon_s = delay_s if self._soon_s is None else min(self._soon_s, delay_s)

    def healthy(self) -> bool:
        """The thread is alive and its last tick ran through. A dead thread is restarted here; it counts
        as unhealthy until the new one has ticked."""
        with self._supervise:
            if self.thread is None or self._stopping.is_set():
                return False
            if not self.thread.is_alive():
                log.error("the %s thread died; starting a new one", self.name)
                self.start()
                return False
            return self._last_tick_ok

    def stop(self) -> None:
        """End the loop after the tick under way (no restart from now on)."""
        with self._supervise:
            self._stopping.set()
        self._wake.set()
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._tick()
                    self._last_tick_ok = True
                except Exception:  # a busy database, a full disk: log, keep going
                    self._last_tick_ok = False
                    log.exception("%s tick failed", self.name)
                wait_s = self._poll_s if self._soon_s is None else min(self._poll_s, self._soon_s)
                self._soon_s = None
                self._wake.wait(wait_s)
                self._wake.clear()
        except BaseException:  # the thread dies: say so now (healthy() restarts it)
            self._last_tick_ok = False
            log.critical("the %s thread died", self.name, exc_info=True)
            raise
