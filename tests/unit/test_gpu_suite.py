"""The GPU suite (bench/gpu_suite.py, issue 17) as far as a CPU can take it: one JSON file and a log, a
timed-out check recorded without stopping the rest, and the carried digits equal scikit-learn's."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import ddp_scaling, gpu_data, gpu_suite


def test_a_check_past_its_budget_is_recorded_as_an_error(tmp_path: Path) -> None:
    log = (tmp_path / "log").open("a")
    entries = gpu_suite.run_check("ddp", gpu_data.CPU, tmp_path, budget=0.2, log_file=log)
    assert [(e["check"], e["status"]) for e in entries] == [("ddp", "error")]
    assert "timed out after 0 s" in entries[0]["error"]


def test_an_exception_in_a_check_becomes_its_error_entry(tmp_path: Path) -> None:
    # what the check added before it raised stays, then its error; the child exits 1
    def broken(scale: gpu_data.Scale, workdir: Path, results: gpu_data.ResultFile) -> None:
        results.add(gpu_data.entry("first", "correctness", "pass"))
        raise ValueError("bad value 42")

    original = gpu_suite.CHECKS
    gpu_suite.CHECKS = (("broken", broken, 1, 1),)  # type: ignore[assignment]
    try:
        code = gpu_suite.run_child("broken", gpu_data.CPU, tmp_path, tmp_path / "r.jsonl")
    finally:
        gpu_suite.CHECKS = original
    entries = gpu_suite.read_entries(tmp_path / "r.jsonl")
    assert code == 1
    assert [e["status"] for e in entries] == ["pass", "error"]
    assert entries[1]["error"] == "ValueError: bad value 42"


def test_the_carried_digits_file_reads_as_scikit_learns_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sklearn.datasets

    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    shutil.copy(source, tmp_path / "digits.csv.gz")
    monkeypatch.setattr(gpu_data, "DATA_DIR", tmp_path)
    images, labels = gpu_data.digits()
    expected = sklearn.datasets.load_digits()
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.target)


@pytest.mark.slow
def test_the_cpu_dry_run_writes_one_json_and_a_log(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "bench.gpu_suite", "--cpu", "--out", str(out),
               "--only", "jpeg_decode", "--only", "ddp"]  # fmt: skip
    subprocess.run(command, check=True, timeout=480, capture_output=True)
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["machine"]["gpu_count"] == 0
    statuses = {r["check"]: r["status"] for r in report["results"]}
    assert statuses == {
        "gpu_jpeg_decode_vs_pil": "skipped: no CUDA",
        "ddp_2gpu_vs_1gpu": "measured (dry run: gloo processes on the CPU)",
    }
    # the DDP row ran both sides through torchrun: 1 process, then 2, each rank training
    ddp = next(r for r in report["results"] if r["check"] == "ddp_2gpu_vs_1gpu")
    assert ddp["values"]["images_per_s_1"] > 0 and ddp["values"]["images_per_s_2"] > 0
    assert ddp["backend"] == "gloo" and ddp["goal"] == 0.9
    decode = next(r for r in report["results"] if r["check"] == "gpu_jpeg_decode_vs_pil")
    assert decode["values"]["images"] == 50 and decode["values"]["not_decoded_or_other_shape"] == 0
    log = out.with_suffix(".log").read_text()
    assert "skipped: no CUDA gpu_jpeg_decode_vs_pil" in log and "=== done in" in log


def test_one_gpu_skips_the_ddp_rows_with_a_note() -> None:
    world, skip = ddp_scaling.plan(cuda=True, gpu_count=1)
    assert world == 0 and skip is not None
    assert skip["check"] == "ddp_2gpu_vs_1gpu" and skip["status"].startswith("skipped: 1 GPU on this machine")
    assert "0.9 x N x 1 GPU" in skip["note"]


def test_several_gpus_are_all_compared_with_one_and_the_cpu_dry_run_uses_two_processes() -> None:
    assert ddp_scaling.plan(cuda=True, gpu_count=8) == (8, None)
    assert ddp_scaling.plan(cuda=False, gpu_count=0) == (2, None)
    assert ddp_scaling.row_name(8) == "ddp_8gpu_vs_1gpu"


def test_images_per_s_leaves_the_warm_up_epoch_out() -> None:
    epochs = [
        {"steps": 10, "epoch_time_s": 100.0},
        {"steps": 10, "epoch_time_s": 2.0},
        {"steps": 10, "epoch_time_s": 4.0},
    ]
    assert ddp_scaling.images_per_s(epochs, global_batch=8) == pytest.approx((40.0 + 20.0) / 2)
