"""bench/latency.py's parts: each half splits into parts that add up to the whole, warm or cold."""

from __future__ import annotations

import math

from bench.service_run import parts

MARKS = {
    "submitted": 100.0, "running": 100.2, "prepared": 101.5, "first_step": 101.9,
    "training_end": 110.0, "packaged": 110.6, "gated": 112.0, "gate_s": 0.4, "served": 112.1, "answer": 112.3,
}  # fmt: skip


def test_a_cold_workers_time_before_the_first_step_is_spawn_imports_build_and_first_batch() -> None:
    worker = {"warm": False, "process_started_at": 100.3, "imports_done_at": 101.2, "assigned_at": 100.3}
    first = parts(MARKS, worker)["first_step_parts_s"]
    assert first == {"queue": 0.2, "spawn": 0.1, "imports": 0.9, "build": 0.3, "first_batch": 0.4}
    assert math.isclose(sum(first.values()), MARKS["first_step"] - MARKS["submitted"])


def test_a_spare_that_had_imported_before_its_job_spends_no_time_importing() -> None:
    worker = {
        "warm": True, "process_started_at": 90.0, "imports_done_at": 95.0,
        "sent_at": 100.25, "assigned_at": 100.26,
    }  # fmt: skip
    first = parts(MARKS, worker)["first_step_parts_s"]
    assert first["imports"] == 0.01  # the hand-over alone
    assert first["spawn"] == 0.05
    assert math.isclose(sum(first.values()), MARKS["first_step"] - MARKS["submitted"])


def test_a_spare_still_importing_when_its_job_came_counts_the_rest_as_imports() -> None:
    worker = {
        "warm": True, "process_started_at": 99.0, "imports_done_at": 101.0,
        "sent_at": 100.25, "assigned_at": 101.0,
    }  # fmt: skip
    assert parts(MARKS, worker)["first_step_parts_s"]["imports"] == 0.75


def test_the_time_to_the_first_answer_is_package_register_gate_promote_and_answer() -> None:
    served = parts(MARKS, {})["served_parts_s"]
    assert served == {"package": 0.6, "register": 1.0, "gate": 0.4, "promote": 0.1, "first_answer": 0.2}
    assert math.isclose(sum(served.values()), MARKS["answer"] - MARKS["training_end"])
