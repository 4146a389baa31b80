"""Run the tests marked `reliability` and write what they recorded to docs/RELIABILITY.md.

    python scripts/reliability_report.py [extra pytest args]

Each row comes from a test that passed (tests/reliability.py): the table is produced by the tests, not
written by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "RELIABILITY.md"
AREAS = ("fault", "distributed", "dataset", "request", "security", "auth", "load")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "records.jsonl"
        env = {**os.environ, "TUNESERVE_RELIABILITY_LOG": str(log)}
        pytest = [sys.executable, "-m", "pytest", "-q", "-m", "reliability", *argv]
        code = subprocess.run(pytest, cwd=ROOT, env=env, check=False).returncode
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render(rows, passed=code == 0))
    sys.stderr.write(f"wrote {OUT} ({len(rows)} rows; pytest exit {code})\n")
    return code


def render(rows: list[dict[str, object]], passed: bool) -> str:
    by_area: dict[str, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        by_area[str(row["area"])].append(row)
    lines = [
        "# Reliability report",
        "",
        "Produced by `make reliability-report`: every row is written by a test marked `reliability`, after",
        "its assertions passed. Faults are caused for real (signals, full disks, killed processes) against",
        "real processes on loopback.",
        "",
    ]
    if not passed:
        lines += ["**Some reliability tests failed in the run that wrote this file.**", ""]
    for area in sorted(by_area, key=lambda a: (AREAS.index(a) if a in AREAS else len(AREAS), a)):
        lines += [f"## {area}", "", "| what was tried | cases | what happened |", "|---|---:|---|"]
        for row in by_area[area]:
            lines.append(f"| {row['case']} | {row['cases']} | {row['outcome']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
