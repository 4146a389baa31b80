"""`tuneserve serve --serving-only` refuses what cannot work, as a real process, before starting TorchServe:
one line naming the problem and the fix, and the CLI's exit code for its status (service.cli.exits)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    environment.update(PYTHONPATH=str(REPO), TUNESERVE_STATE_DIR=str(tmp_path / "replica"), **env)
    command = [sys.executable, "-m", "service.cli.main", "serve", "--serving-only", *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    return (done.stdout + done.stderr).strip().splitlines()[-1]


def test_the_job_api_port_options_are_refused(tmp_path: Path) -> None:
    done = serve(tmp_path, "--port", "50051")
    assert done.returncode == 2
    assert last_line(done) == (
        "error: INVALID_ARGUMENT: --host/--port set the job API, which --serving-only does not run"
    )


@pytest.mark.slow
def test_a_missing_model_store_is_refused_naming_the_setting(tmp_path: Path) -> None:
    done = serve(tmp_path, "--model-store", str(tmp_path / "not-mounted"))
    assert done.returncode == 4, done.stderr
    line = last_line(done)
    assert line.startswith("error: FAILED_PRECONDITION: model store ") and "TUNESERVE_MODEL_STORE_DIR" in line
    assert not (tmp_path / "replica" / "torchserve" / "tmp").exists()  # TorchServe never started


@pytest.mark.slow
def test_serving_only_with_torchserve_disabled_is_refused(tmp_path: Path) -> None:
    done = serve(tmp_path, TUNESERVE_TORCHSERVE_ENABLED="false")
    assert done.returncode == 4, done.stderr
    assert "TUNESERVE_TORCHSERVE_ENABLED is false" in last_line(done)
