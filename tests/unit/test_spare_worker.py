"""The spare worker's assignment line (service.jobs.spare_worker): what the launcher sends arrives whole."""

from __future__ import annotations

from service.jobs.spare_worker import Assignment, comparable_env


def test_an_assignment_reaches_the_spare_whole() -> None:
    sent = Assignment("job-1", "/state/jobs/job-1/worker.log", {"A": "1", "TOKEN": "x y\nz"}, sent_at=12.5)
    assert Assignment.decode(sent.encode()) == sent
    assert sent.encode().count(b"\n") == 1  # one line, whatever the environment holds


def test_the_report_address_token_and_gpus_do_not_decide_whether_a_spare_fits() -> None:
    job = {
        "TUNESERVE_REPORT_TOKEN": "t",
        "TUNESERVE_REPORT_ADDRESS": "a",
        "CUDA_VISIBLE_DEVICES": "1",
        "X": "1",
    }
    assert comparable_env(job) == {"X": "1"}
