"""ServingLock with real threads: one change per model, changes to different models at once, a
(re)start alone and ahead of changes asked for while it waits.

"Still waiting" is checked by a short wait that must time out: it cannot fail when the lock is right;
when the lock is wrong it fails unless the machine stalls the other thread for that long."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager

import pytest

from service.packaging.serving_lock import ServingLock

STILL_WAITING_S = 0.3
DONE_S = 30.0


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


Enter = Callable[[], AbstractContextManager[None]]


def hold(enter: Enter, entered: threading.Event, leave: threading.Event) -> None:
    with enter():
        entered.set()
        assert leave.wait(DONE_S)


def started(pool: ThreadPoolExecutor, enter: Enter) -> tuple[Future[None], threading.Event, threading.Event]:
    entered, leave = threading.Event(), threading.Event()
    return pool.submit(hold, enter, entered, leave), entered, leave


def test_changes_to_two_models_run_at_once(pool: ThreadPoolExecutor) -> None:
    lock = ServingLock()
    first, first_in, first_out = started(pool, lambda: lock.model("pets"))
    assert first_in.wait(DONE_S)
    second, second_in, second_out = started(pool, lambda: lock.model("cats"))
    assert second_in.wait(DONE_S), "a change to another model waited for the loading one"
    second_out.set()
    first_out.set()
    first.result(DONE_S), second.result(DONE_S)


def test_a_second_change_to_one_model_waits_for_the_first(pool: ThreadPoolExecutor) -> None:
    lock = ServingLock()
    first, first_in, first_out = started(pool, lambda: lock.model("pets"))
    assert first_in.wait(DONE_S)
    second, second_in, second_out = started(pool, lambda: lock.model("pets"))
    assert not second_in.wait(STILL_WAITING_S)
    first_out.set()
    assert second_in.wait(DONE_S)
    second_out.set()
    first.result(DONE_S), second.result(DONE_S)


def test_a_restart_waits_for_changes_under_way_and_goes_before_changes_asked_for_meanwhile(
    pool: ThreadPoolExecutor,
) -> None:
    lock = ServingLock()
    change, change_in, change_out = started(pool, lambda: lock.model("pets"))
    assert change_in.wait(DONE_S)
    restart, restart_in, restart_out = started(pool, lock.alone)
    assert not restart_in.wait(STILL_WAITING_S)
    later, later_in, later_out = started(pool, lambda: lock.model("cats"))
    assert not later_in.wait(STILL_WAITING_S), "a change started while a restart waited: it could starve"
    change_out.set()
    assert restart_in.wait(DONE_S)
    assert not later_in.wait(STILL_WAITING_S), "a change ran during a restart"
    restart_out.set()
    assert later_in.wait(DONE_S)
    later_out.set()
    for future in (change, restart, later):
        future.result(DONE_S)


def test_a_restart_nests_and_may_change_a_model_whose_next_change_waits_for_it(
    pool: ThreadPoolExecutor,
) -> None:
    lock = ServingLock()
    restart_in, restart_out = threading.Event(), threading.Event()

    def restart() -> None:
        with lock.alone():
            restart_in.set()
            assert restart_out.wait(DONE_S)
            with lock.alone(), lock.model("pets"):  # start() -> restore() registers pets again
                pass

    running = pool.submit(restart)
    assert restart_in.wait(DONE_S)
    waiting, waiting_in, waiting_out = started(pool, lambda: lock.model("pets"))  # holds pets' own lock
    assert not waiting_in.wait(STILL_WAITING_S)
    restart_out.set()
    running.result(DONE_S)  # did not wait for pets' lock, held by the change waiting for the restart
    assert waiting_in.wait(DONE_S)
    waiting_out.set()
    waiting.result(DONE_S)


def test_a_change_that_raises_lets_the_next_one_in() -> None:
    lock = ServingLock()
    with pytest.raises(RuntimeError), lock.model("pets"):
        raise RuntimeError("deploy failed")
    with lock.alone(), lock.model("pets"):
        pass
    with lock.model("pets"):
        pass


def test_a_change_inside_a_change_or_a_restart_inside_a_change_is_refused_not_left_hanging() -> None:
    lock = ServingLock()
    refusals = {
        "a change to model pets inside the change to model pets": lambda: lock.model("pets"),
        "a change to model cats inside the change to model pets": lambda: lock.model("cats"),
        "a \\(re\\)start inside the change to model pets": lock.alone,
    }
    with lock.model("pets"):
        for message, enter in refusals.items():
            with pytest.raises(RuntimeError, match=message), enter():
                pass

    def change_pets() -> None:
        with lock.model("pets"):
            pass

    with lock.model("cats"), ThreadPoolExecutor(max_workers=1) as other:  # the refusals left nothing held
        other.submit(change_pets).result(DONE_S)
    with lock.alone():
        pass
