"""bench/latency.py's parts: each half splits into parts that add up to the whole, warm or cold."""

from __future__ import annotations

import math
import time

from bench.service_run import parts, register_parts

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


# TorchServe's lines, shortened (the thread and class columns) to what register_parts reads
TS_LOG = """\
2026-12-02T21:33:35,345 [DEBUG] epollEventLoopGroup-3-3 ModelManager - updateModel: bench, count: 1
2026-12-02T21:33:37,368 [INFO ] W-9000-bench_1-stdout MODEL_LOG - Torch worker started.
2026-12-02T21:33:37,386 [DEBUG] W-9000-bench_1 WorkerThread - Flushing req.cmd LOAD repeats 1 to backend
2026-12-02T21:33:41,191 [INFO ] W-9000-bench_1-stdout MODEL_LOG - loaded mobilenet_v3_small on cpu in 3.8 s
"""
ACCESS_LOG = """\
2026-12-02T21:33:34,339 - /127.0.0.1:48662 "GET /ping HTTP/1.1" 200 5
2026-12-02T21:33:35,350 - /127.0.0.1:47636 "POST /models?url=bench-v1.mar&model_name=bench HTTP/1.1" 202 1011
"""


def test_register_splits_by_torchserves_logs_into_parts_that_add_up(tmp_path) -> None:
    (tmp_path / "ts_log.log").write_text(TS_LOG)
    (tmp_path / "access_log.log").write_text(ACCESS_LOG)
    registered = _local("2026-12-02T21:33:41") + 0.241  # the service's poll saw it ready 50 ms late
    packaged = registered - 8.6
    split = register_parts(tmp_path, packaged, registered, "bench")
    assert split == {
        "request": 1.698, "unpack": 1.006, "worker_process": 2.023, "connect": 0.018, "handler": 3.805,
        "ready_seen": 0.05,
    }  # fmt: skip
    assert math.isclose(sum(split.values()), 8.6, abs_tol=0.002)
    assert register_parts(tmp_path, packaged, registered, "other") == {}  # no register call for that model


def test_register_parts_are_empty_when_torchserve_logged_no_worker_start(tmp_path) -> None:
    (tmp_path / "ts_log.log").write_text(TS_LOG.replace("Torch worker started.", "something else"))
    (tmp_path / "access_log.log").write_text(ACCESS_LOG)
    assert register_parts(tmp_path, 0.0, 1.0, "bench") == {}


def _local(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
