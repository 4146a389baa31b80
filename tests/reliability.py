"""The reliability report's records: a test that causes a fault or sends hostile input says what it tried,
how many cases, and what happened, once its assertions have passed.

`make reliability-report` runs the tests marked `reliability` with TUNESERVE_RELIABILITY_LOG set and
scripts/reliability_report.py turns the records into docs/RELIABILITY.md. Without the variable (a plain
`make test`) nothing is written.
"""

from __future__ import annotations

import json
import os

LOG_ENV = "TUNESERVE_RELIABILITY_LOG"


def record(area: str, case: str, cases: int, outcome: str) -> None:
    """Append one row: `area` (fault, distributed, dataset, request, security, auth, load), what was tried,
    how many times, and what the service did. Call it after the test's assertions, so only what held is
    reported."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"area": area, "case": case, "cases": cases, "outcome": outcome}) + "\n"
    # One write of a short line to an O_APPEND file: rows from parallel processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
