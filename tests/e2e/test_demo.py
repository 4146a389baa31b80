"""`make demo`, smaller: scripts/demo.py --quick end to end (service, training, TorchServe, predictions)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port_block

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
    # ports from outside the kernel's ephemeral range: the demo's own free ones can be taken by the
    # other worker's connections before the service binds them
    base = free_port_block(6)
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--quick",
            "--dir",
            str(folder),
            "--port-base",
            str(base),
        ],
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


# Floors the quick demo (EfficientNet-Lite0, ImageNet weights, head only, 50 digits a class, 3 epochs at
# 64 px) clears with margin. Measured on the 2-core CPU: 0.89 validation accuracy and 7 of 10 held-out
# digits with the Lite0 weights as main loads them today; 0.88 and 8 of 10 with the normalisation fix
# (tf_efficientnet_lite0, mean = std = 0.5); 0.77 and 7 of 10 with the backbone's weights not loaded at
# all. Ten digits cannot tell a pretrained backbone from a random one; the 100 validation images can.
# Chance is 0.10.
MIN_VAL_ACCURACY = 0.80
MIN_HELDOUT_CORRECT = 5


@dataclass(frozen=True)
class Row:
    """One printed held-out digit: its file, the truth the demo printed, both answers, the ok/wrong mark."""

    file: str
    truth: str
    rest: str
    predict: str
    mark: str

    @property
    def digit(self) -> str:
        """The true digit, from the file name the demo wrote (<digit>_<n>.png)."""
        return self.file.split("_")[0]


def heldout_rows(stdout: str) -> list[Row]:
    rows = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0].endswith(".png"):
            rest = re.fullmatch(r"(\S+) \((0\.\d\d|1\.00)\)", cells[2])  # the label (its probability)
            assert rest is not None, line
            rows.append(Row(cells[0], cells[1], rest.group(1), cells[3], cells[4]))
    return rows


def test_quick_demo_predicts_the_held_out_digits_above_the_floor(
    demo: subprocess.CompletedProcess[str],
) -> None:
    assert "TorchServe REST" in demo.stdout and "tuneserve Predict" in demo.stdout
    rows = heldout_rows(demo.stdout)
    assert sorted(row.digit for row in rows) == [str(d) for d in range(10)], demo.stdout[-4000:]
    for row in rows:
        assert re.fullmatch(r"\d_1\.png", row.file) and row.truth == row.digit, row
        assert row.predict == row.rest, f"{row.file}: REST says {row.rest}, Predict says {row.predict}"
        assert row.mark == ("ok" if row.rest == row.digit else "wrong"), row
    correct = sum(row.rest == row.digit for row in rows)
    printed = re.search(r"accuracy on 10 held-out digits: ([\d.]+)%", demo.stdout)
    assert printed is not None and float(printed.group(1)) == pytest.approx(100 * correct / 10)
    assert correct >= MIN_HELDOUT_CORRECT, [(row.file, row.rest) for row in rows]


def test_quick_demo_job_reaches_the_validation_floor(demo: subprocess.CompletedProcess[str]) -> None:
    best = re.search(r"best val_accuracy\s+([\d.]+)", demo.stdout)
    assert best is not None, demo.stdout[-4000:]
    assert float(best.group(1)) >= MIN_VAL_ACCURACY, best.group(0)


def test_quick_demo_says_where_everything_is(demo: subprocess.CompletedProcess[str]) -> None:
    for name in ("TensorBoard logs", "W&B offline run", "checkpoints", "TorchServe archive"):
        assert name in demo.stdout
    assert re.search(r"digits-v\d+\.mar", demo.stdout)
