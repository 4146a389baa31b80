"""A real TorchServe started by tuneserve sees only the serving GPUs (read back from its process)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.packaging.torchserve_process import TorchServeProcess
from service.settings import Settings
from tests.ports import torchserve_ports

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]


def environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def test_torchserve_runs_with_the_serving_gpus_visible_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # the service itself was given three GPUs
    settings = Settings.model_validate(
        {
            "state_dir": tmp_path,
            "gpu_count": 3,  # no GPU here: the override knob stands in for CUDA's count
            "serving_gpus": "1",
            **torchserve_ports(),
            "torchserve_java_heap": "256m",
            "torchserve_start_timeout_s": 120,
        }
    )
    process = TorchServeProcess(settings, worker_threads=1)
    process.start()
    try:
        java = process.java_pid()
        assert java is not None
        seen = environ_of(java)
        config = process.paths.config.read_text()
    finally:
        process.stop()
    assert seen["CUDA_VISIBLE_DEVICES"] == "5"  # the service's GPU 1 is the machine's GPU 5
    assert "\nnumber_of_gpu=1\n" in config
