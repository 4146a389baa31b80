"""LoadWatch: when wait_ready gives up on a version whose workers die while they load.

The describes are shaped like TorchServe 0.12's (a worker keeps its id; its pid is -1 until the
process says it started, then the new process's after each restart): the sequence a broken handler
gave against a real TorchServe is in tests/integration/test_serving.py."""

from __future__ import annotations

from service.packaging.management import LoadWatch, VersionInfo


def described(*workers: tuple[str, int, str]) -> VersionInfo:
    return VersionInfo(
        name="pets", version="1", archive="pets-v1.mar", batch_size=1, max_batch_delay_ms=0,
        worker_states=tuple(state for _, _, state in workers),
        worker_pids=tuple((worker, pid) for worker, pid, _ in workers),
    )  # fmt: skip


def test_a_worker_loading_in_one_process_is_never_given_up() -> None:
    watch = LoadWatch()
    for pid in (-1, -1, 501, 501, 501):
        assert watch.died_too_often(described(("9000", pid, "UNLOADING"))) is None


def test_one_restart_is_forgiven_and_the_second_gives_the_processes_in_order() -> None:
    watch = LoadWatch()
    for pid in (-1, 501, 501, 502, 502):  # the zygote's death took the first process with it
        assert watch.died_too_often(described(("9000", pid, "UNLOADING"))) is None
    assert watch.died_too_often(described(("9000", 503, "UNLOADING"))) == [501, 502, 503]


def test_workers_are_told_apart_by_id() -> None:
    watch = LoadWatch()
    assert watch.died_too_often(described(("9000", 501, "UNLOADING"), ("9001", 601, "UNLOADING"))) is None
    # each restarted once: forgiven, though two processes changed in all
    assert watch.died_too_often(described(("9000", 502, "UNLOADING"), ("9001", 602, "UNLOADING"))) is None
    assert watch.died_too_often(described(("9000", 502, "READY"), ("9001", 603, "UNLOADING"))) == [
        601,
        602,
        603,
    ]
