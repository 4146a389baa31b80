"""The benchmarks at their smallest: each gives its JSON shape with positive, finite figures."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagefolders import one_thread

from bench import (
    cache_speed,
    control_plane,
    create_cpu,
    ddp,
    deploy_stall,
    gc_pause,
    grpc_aio,
    lightning_compare,
    loop_speed,
    reporting,
    run_all,
)
from bench.common import emit


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_loop_speed_compares_full_and_frozen_with_the_reference_loop() -> None:
    result = loop_speed.run(loop_speed.Size("resnet18", 32, 8, steps=2, rounds=2))
    assert result["benchmark"] == "loop_speed" and result["plan"] == "cpu (fp32)"
    for case in ("full", "frozen"):
        figures = result[case]
        assert set(figures) == {"ours_img_per_s", "reference_img_per_s", "ratio"}
        assert all(_positive(v) for v in figures.values()), figures
    # (no speed comparison here: a timed assertion fails on a loaded machine; the JSON reports it)


def test_feature_cache_speeds_up_later_epochs_and_trains_the_same(tmp_path: Any) -> None:
    result = cache_speed.run(cache_speed.Size("resnet18", 32, 6, batch_size=8, epochs=2), tmp_path)
    assert result["cache_reported"] is True
    assert _positive(result["later_epoch_s"]["cached"]) and _positive(result["later_epoch_s"]["uncached"])
    assert result["speedup_later_epochs"] > 1.0, result
    assert result["max_rel_loss_diff"] < 1e-4, result


def test_control_plane_measures_reads_and_writes_under_many_clients() -> None:
    result = control_plane.run(control_plane.Size(jobs=3, seconds=0.3, clients=(8,)))
    for rpc in ("GetJob", "ListJobs", "CreateJob", "CancelJob"):
        figures = result[rpc]
        assert figures["errors"] == 0, (rpc, figures)
        for key in (
            "calls_per_s_8_clients",
            "p99_ms_8_clients",
            "p99_ms_1_client",
            "p99_vs_1_client_8_clients",
        ):
            assert _positive(figures[key]), (rpc, key, figures)
        assert figures["p50_ms"] <= figures["p99_ms"] == figures["p99_ms_8_clients"]
    for rpc in ("GetJob", "ListJobs"):
        assert _positive(result[rpc]["grpc_vs_in_process"]) and _positive(
            result[rpc]["store_ms_per_call_in_process"]
        )
    # each client loops create-then-cancel, so both were made as often
    for key in ("calls_per_s_1_client", "calls_per_s_8_clients"):
        assert result["CreateJob"][key] == result["CancelJob"][key]


def test_grpc_aio_serves_getjob_from_the_same_jobs_on_all_five_servers() -> None:
    result = grpc_aio.run(rounds=1, clients=4, seconds=0.3, jobs_stored=3)
    servers = ("threaded", "aio_inline", "aio_thread_pool", "threaded_4_workers", "floor")
    for kind in servers:
        figures = result[kind]
        assert figures["errors"] == 0, (kind, figures)
        assert all(_positive(x) for x in figures["calls_per_s"] + figures["p99_ms"]), (kind, figures)
    for kind in servers[1:]:
        assert _positive(result[kind]["calls_per_s_vs_threaded_median"]), result[kind]
    for kind in ("threaded", "floor"):  # one client alone, and the crowd's tail against it
        assert _positive(result[kind]["p99_ms_1_client"][0]), result[kind]
        assert _positive(result[kind]["p99_vs_1_client_4_clients"][0]), result[kind]
    # the floor's fixed reply is a real job's message, not an empty one
    assert result["floor_reply_bytes"] > 100


@pytest.mark.slow
def test_control_plane_spreads_its_clients_over_replicas_on_postgresql(postgres_database: str) -> None:
    size = control_plane.Size(jobs=4, seconds=0.5, clients=(4,))
    result = control_plane.run(size, postgres_database, replicas=2)
    assert result["store"] == "postgresql" and result["replicas"] == 2
    for rpc in ("GetJob", "ListJobs", "CreateJob", "CancelJob"):
        assert result[rpc]["errors"] == 0 and _positive(result[rpc]["calls_per_s_4_clients"]), result[rpc]
    # the crowd's jobs are in the one database, beside the jobs made before the measurements
    from service.jobs.store import JobStore

    store = JobStore(postgres_database)
    try:
        jobs, _ = store.list_jobs((), 500, "")
        assert len(jobs) > size.jobs
    finally:
        store.close()
    with pytest.raises(ValueError, match="--postgres-url"):
        control_plane.run(size, None, replicas=2)


def test_reporting_measures_events_through_the_real_server_and_the_old_per_event_path(tmp_path: Any) -> None:
    result = reporting.events_per_second(tmp_path, 300)
    assert result["events"] == 300
    for name in (
        "grpc_events_per_s",
        "event_call_us",
        "store_per_event_events_per_s",
        "grpc_vs_store_per_event",
    ):
        assert _positive(result[name]), result


def test_gc_pause_times_full_collections_before_and_after_the_freeze_in_one_process() -> None:
    result = gc_pause.run(2)
    assert result["objects_frozen"] > 100_000  # torch's modules
    assert result["full_collection_ms_unfrozen"] > 0
    # a full collection with torch's objects frozen walks almost nothing: far below the unfrozen one
    assert result["frozen_vs_unfrozen"] < 0.1


def test_create_cpu_times_both_ways_of_the_create_path_in_one_process() -> None:
    result = create_cpu.run(60, 2)  # it checks first that both ways give the same bytes
    assert all(_positive(v) for v in result["cpu_ms_per_call"].values()), result
    assert _positive(result["spec_message_vs_json_format"]), result
    assert _positive(result["admission_vs_uncached"]), result


def test_a_result_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    emit({"benchmark": "x", "ratio": 1.5})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"benchmark": "x", "ratio": 1.5}


@pytest.mark.slow
def test_ddp_compares_two_processes_with_one_and_reports_the_equivalence_error() -> None:
    result = ddp.run(ddp.Size(per_class=10, image_size=32, batch_size=8, epochs=2))
    assert result["benchmark"] == "ddp" and result["two_processes"]["backend"] == "gloo"
    assert all(_positive(v) for v in result["one_process"].values()) and _positive(result["ratio"])
    assert result["equivalence_max_abs"] <= 1e-6


def test_run_all_refuses_an_unknown_benchmark_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--only", "warp_speed"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'warp_speed'" in capsys.readouterr().err


def _needs_lightning() -> None:
    """Lightning is a bench-only dependency: a missing one skips here, and fails under CI (make setup
    installs the `bench` extra)."""
    if importlib.util.find_spec("lightning") is None:
        if os.environ.get("CI"):
            pytest.fail("lightning is not installed: `make setup` installs the bench extra")
        pytest.skip("lightning is not installed (pip install -e .[bench])")


def test_the_lightning_comparison_splits_the_digits_the_same_way_each_time(tmp_path: Path) -> None:
    size = lightning_compare.Size(digits=50, image_size=16, batch_size=4, epochs=1, head_epochs=1)
    counts = lightning_compare.write_digit_split(tmp_path / "a", size)
    again = lightning_compare.write_digit_split(tmp_path / "b", size)
    assert counts == again and sum(counts) == 50 and counts[1] >= 10  # 1 in 5 of each class held out

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*.png")}

    assert files(tmp_path / "a") == files(tmp_path / "b")
    classes = {p.name for p in (tmp_path / "a" / "val").iterdir()}
    assert classes == {p.name for p in (tmp_path / "a" / "train").iterdir()}  # every class on both sides


@pytest.mark.slow  # importing Lightning alone takes seconds
def test_the_lightning_side_keeps_frozen_batchnorm_in_eval_mode_as_tuneserve_does() -> None:
    _needs_lightning()
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from bench.lightning_finetune import Classifier, FreezePrefix

    modes: list[bool] = []

    class Recording(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            modes.append(self.model[1].training)  # the frozen BatchNorm
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    statistics, frozen, head = model[1].running_mean.clone(), model[0].weight.clone(), model[3].weight.clone()
    data = TensorDataset(torch.randn(16, 3, 8, 8) + 3.0, torch.randint(0, 2, (16,)))
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, enable_checkpointing=False, callbacks=[FreezePrefix("1")],
    )  # fmt: skip
    trainer.fit(
        Recording(model, "adamw", 1e-2), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4)
    )
    assert modes and not any(modes)  # eval in every step, the second epoch (after validation) too
    assert torch.equal(model[1].running_mean, statistics) and torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[3].weight, head)


@pytest.mark.slow
def test_the_lightning_comparison_reports_both_sides_of_both_cases(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _needs_lightning()
    lightning_compare.main(["--quick"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "lightning_compare" and result["model"] == lightning_compare.ARCHITECTURE
    for case, cached in (("full", False), ("head_only", True)):
        figures = result[case]
        for key in ("tuneserve_s", "lightning_s", "ratio", "ratio_without_imports"):
            assert _positive(figures[key]), (case, key, figures)
        assert figures["goal"] == lightning_compare.GOALS[case]
        for side in ("tuneserve", "lightning"):
            assert 0.0 <= figures[f"{side}_val_accuracy"] <= 1.0, figures
        assert set(figures["tuneserve_parts_s"]) == {"to_first_step", "training"}
        assert set(figures["lightning_parts_s"]) == {"start_and_imports", "build", "fit"}
        assert figures["feature_cache"] is cached, (case, figures)  # the head-only job used the cache


@pytest.mark.slow
@pytest.mark.torchserve
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java")
def test_deploy_stall_measures_predictions_while_a_version_loads_registered_both_ways() -> None:
    result = deploy_stall.run(**deploy_stall.QUICK)
    for way in deploy_stall.WAYS:
        assert result[way]["predictions"] == deploy_stall.QUICK["predictions"]
        assert _positive(result[way]["p50_ms"]) and result[way]["max_ms"] >= result[way]["p99_ms"]
    # TorchServe's synchronous registration holds one of its 4 Netty threads while the version loads:
    # of 8 new connections in a row, those that land on it wait (at least one)
    assert result["synchronous"]["stalled"] >= 1
    assert result["ours"]["max_ms"] < result["synchronous"]["max_ms"]
