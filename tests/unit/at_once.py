"""Calls made by several threads released together, for tests of what happens when callers collide."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def at_once(callers: int, call: Callable[[], Any], timeout_s: float = 120.0) -> list[Any]:
    """`call()` from `callers` threads that start together; each one's result, or the exception it raised."""
    start = threading.Barrier(callers)
    outcomes: list[Any] = []

    def one() -> None:
        start.wait()
        try:
            outcomes.append(call())
        except Exception as exc:  # the test decides what a caller's error means
            outcomes.append(exc)

    threads = [threading.Thread(target=one) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    assert not any(thread.is_alive() for thread in threads), f"a caller was still running after {timeout_s} s"
    return outcomes
