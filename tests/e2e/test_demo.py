"""`make demo`, smaller: scripts/demo.py --quick end to end (service, training, TorchServe, predictions)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    folder = tmp_path_factory.mktemp("demo")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--dir", str(folder)],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_quick_demo_exits_0_and_stops_the_service_cleanly(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    assert "the service stopped cleanly" in demo.stdout


def test_quick_demo_shows_progress_and_the_served_summary(demo: subprocess.CompletedProcess[str]) -> None:
    for expected in (
        "EPOCH",
        "epoch 3/3",
        "PACKAGED",
        "SERVED",
        ": SUCCEEDED",
        "call (REST)",
        "tuneserve predict",
    ):
        assert expected in demo.stdout, expected


def test_quick_demo_prints_predictions_against_truth_and_accuracy(
    demo: subprocess.CompletedProcess[str],
) -> None:
    assert "TorchServe REST" in demo.stdout and "tuneserve Predict" in demo.stdout
    rows = re.findall(r"│ (\d)_1\.png\s+│ (\d)\s+│ (\d) \((0\.\d\d|1\.00)\)", demo.stdout)
    assert len(rows) == 10 and all(name == truth for name, truth, _, _ in rows)
    accuracy = re.search(r"accuracy on 10 held-out digits: ([\d.]+)%", demo.stdout)
    assert accuracy is not None and 0.0 <= float(accuracy.group(1)) <= 100.0


def test_quick_demo_says_where_everything_is(demo: subprocess.CompletedProcess[str]) -> None:
    for name in ("TensorBoard logs", "W&B offline run", "checkpoints", "TorchServe archive"):
        assert name in demo.stdout
    assert re.search(r"digits-v\d+\.mar", demo.stdout)
