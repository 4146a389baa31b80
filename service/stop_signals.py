"""SIGTERM and SIGINT as a stop request, for the service's entry points (the full service, a serving
replica): the handler only sets an event, and the main thread does the stopping when it sees it."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


def stop_on_signals(doing: str) -> threading.Event:
    """An event that SIGTERM or SIGINT sets (logged as "received SIGTERM; <doing>"). Install it before
    start-up: a SIGTERM while TorchServe starts must still stop it, not orphan its JVM."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s; %s", signal.Signals(signum).name, doing)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop
