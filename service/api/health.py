"""Publishes what a probe finds on the gRPC health service, refreshed every few seconds.

Two reporters run (service.app): the server as a whole ("") and `tuneserve.v1.FineTuning` follow the
job store (a write really reaches it) and the scheduler thread (alive, restarted when it died);
`torchserve` (TorchServe answers its ping) and `torchserve/<model>` (the model's default version has a
ready worker) follow TorchServe. `tuneserve.v1.Inference` follows TorchServe's availability as it
changes. A model that is no longer served goes back to SERVICE_UNKNOWN, as if it had never been there.
A probe that raises reports every name it knows NOT_SERVING.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

INTERVAL_S = 2.0

Probe = Callable[[], Mapping[str, bool]]  # name -> ready, e.g. TorchServeBackend.health
Publish = Callable[[str, bool | None], None]  # None: unknown (no longer there)


class HealthReporter:
    """Calls `probe` every `interval_s` and publishes what it says; start() once, stop() once.

    `names`: published before the first probe answered, so a probe failing from the start reports them
    NOT_SERVING too.
    """

    def __init__(
        self, probe: Probe, publish: Publish, interval_s: float = INTERVAL_S, names: Iterable[str] = ()
    ) -> None:
        self._probe, self._publish, self._interval_s = probe, publish, interval_s
        self._known: set[str] = set(names)
        self._failing = False  # log a failing probe once per streak, not every interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def report_once(self) -> None:
        """Probe and publish now (the thread's one step)."""
        try:
            status = dict(self._probe())
            if self._failing:
                log.info("the health probe works again")
            self._failing = False
        except Exception:  # a failing probe means nothing is known to be ready
            if not self._failing:
                log.exception("the health probe failed; reporting everything NOT_SERVING until it works")
            self._failing = True
            status = dict.fromkeys(self._known, False)
        for name, ready in status.items():
            self._publish(name, ready)
        for name in self._known - status.keys():
            self._publish(name, None)
        self._known = set(status)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.report_once()
            self._stop.wait(self._interval_s)
