"""Callers that miss a cache for the same key at once: the first does the work, the others wait for it.

A burst of CreateJobs for one new architecture or dataset (a fresh replica's first clients, a sweep
submitted at once) missed the layer-table cache and the scan cache together, and each call then built the
model or walked the dataset itself: 16 at once built resnet50 16 times, 4.9 s for the last caller against
0.09 s alone. With this, the others wait for the first and then read what it cached. When the first fails
(its error is not cached), the others do the work themselves and get their own error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class OneAtATime:
    """`run(key, work)`: `work()` (which reads and fills a cache), never twice at once for one key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[Hashable, threading.Lock] = {}

    def run(self, key: Hashable, work: Callable[[], T]) -> T:
        with self._lock:
            busy = self._busy.get(key)
            first = busy is None
            if busy is None:
                busy = self._busy[key] = threading.Lock()
                busy.acquire()
        if not first:
            with busy:  # released when the first caller is done
                pass
            return work()  # what the first cached; its work again only when it failed or did not keep it
        try:
            return work()
        finally:
            with self._lock:
                del self._busy[key]
            busy.release()
