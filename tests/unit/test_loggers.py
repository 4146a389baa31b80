"""TensorBoard and W&B logs of a real (tiny) run, read back from disk; W&B never stops training."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagefolders import job_spec, make_image_folder, one_thread

from service.jobs.records import EventKind
from service.jobs.spec import WandbSpec
from service.settings import Settings
from service.training import wandb_logger
from service.training.checkpoints import load_checkpoint
from service.training.reporting import CollectingReporter
from service.training.runner import train
from service.training.wandb_logger import WandbLogger, resolve_mode


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, CollectingReporter]]:
    """One 2-epoch job with TensorBoard and W&B (offline) on; its job folder and reporter."""
    root = tmp_path_factory.mktemp("logged")
    make_image_folder(root / "data" / "ds", classes=3, per_class=6)
    spec = job_spec(logging={"tensorboard": True, "wandb": {"mode": "offline", "tags": ["test"]}})
    settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
    reporter = CollectingReporter()
    with pytest.MonkeyPatch.context() as patch, one_thread():
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
            patch.delenv(name, raising=False)
        train(spec, root / "job", settings, reporter)
    yield root / "job", reporter


@pytest.fixture(scope="module")
def tb_events(logged_run: tuple[Path, CollectingReporter]) -> Any:
    """The run's main TensorBoard events, loaded once."""
    return _accumulator(logged_run[0] / "tensorboard")


def _accumulator(path: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0, "compressedHistograms": 0}
    accumulator = EventAccumulator(str(path), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def test_tensorboard_has_scalars_histograms_images_and_text(
    logged_run: tuple[Path, CollectingReporter],
) -> None:
    job_dir, reporter = logged_run
    assert reporter.fields["tensorboard_dir"] == str(job_dir / "tensorboard")
    tags = _accumulator(job_dir / "tensorboard").Tags()
    assert {
        "train/loss",
        "train/lr",
        "epoch/train_loss",
        "epoch/val_loss",
        "epoch/val_accuracy",
        "epoch/lr",
    } <= set(tags["scalars"])
    assert any(t.startswith("weights/classifier.3") for t in tags["histograms"])
    assert any(t.startswith("gradients/") for t in tags["histograms"])
    assert {"train/batch", "val/predictions"} <= set(tags["images"])
    assert {"model/layers/text_summary", "report/per_class/text_summary"} <= set(tags["tensors"])


def test_tensorboard_scalars_cover_every_step_and_epoch(
    logged_run: tuple[Path, CollectingReporter], tb_events: Any
) -> None:
    steps = load_checkpoint(logged_run[0] / "checkpoints" / "last.pt")["step"]
    assert [e.step for e in tb_events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert [e.step for e in tb_events.Scalars("epoch/val_loss")] == [1, 2]


def test_tensorboard_hparams_hold_the_final_metrics(logged_run: tuple[Path, CollectingReporter]) -> None:
    job_dir, _ = logged_run
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = _accumulator(job_dir / "tensorboard" / "hparams").PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["architecture"].string_value == "mobilenet_v3_small"
    assert hparams["lr"].number_value == pytest.approx(0.01)
    assert "hparam/val_loss" in _accumulator(job_dir / "tensorboard" / "hparams").Tags()["scalars"]


def test_tensorboard_projector_has_features_labels_and_thumbnails(
    logged_run: tuple[Path, CollectingReporter],
) -> None:
    job_dir, _ = logged_run
    config = (job_dir / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "val_features" in config and "metadata.tsv" in config and "sprite.png" in config
    (metadata,) = (job_dir / "tensorboard").glob("*/val_features/metadata.tsv")
    labels = metadata.read_text().split()
    assert set(labels) <= {"class_0", "class_1", "class_2"} and len(labels) > 0
    assert (metadata.parent / "sprite.png").exists() and (metadata.parent / "tensors.tsv").exists()


def read_wandb_records(run_dir: Path) -> dict[str, Any]:
    """history rows, summary and config from an offline run's `.wandb` file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, position, pending, records = path.read_bytes(), 7, b"", []  # 7-byte W&B header
    block = 32 * 1024
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))  # type: ignore[attr-defined]
    result: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            item = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            result["history"].append(item)
        elif kind == "summary":
            for update in record.summary.update:
                result["summary"][update.key or "/".join(update.nested_key)] = json.loads(update.value_json)
        elif kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            result["config"].update({u.key: json.loads(u.value_json) for u in config.update})
    return result


def test_wandb_offline_run_holds_history_summary_and_config(
    logged_run: tuple[Path, CollectingReporter],
) -> None:
    job_dir, reporter = logged_run
    run_dir = Path(reporter.fields["wandb_dir"])
    assert run_dir.parent == job_dir / "wandb" and run_dir.name.endswith(reporter.fields["wandb_run_id"])
    records = read_wandb_records(run_dir)
    assert any("train/loss" in row for row in records["history"])
    epochs = [row["epoch"] for row in records["history"] if "epoch/val_loss" in row]
    assert epochs == [1, 2]
    assert records["summary"]["best_val_loss"] == pytest.approx(reporter.fields["best_metric"])
    assert records["config"]["name"] == "test-job" and records["config"]["training"]["lr"] == 0.01
    checkpoint = load_checkpoint(job_dir / "checkpoints" / "last.pt")
    assert checkpoint["wandb_run_id"] == reporter.fields["wandb_run_id"]


def test_auto_mode_is_online_only_with_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    logger = WandbLogger.start(
        WandbSpec(mode="disabled"), job_dir=tmp_path, config={}, run_id=None, reporter=CollectingReporter()
    )
    logger.log({"loss": 1.0}, 1)
    logger.finish()
    assert not logger.enabled and list(tmp_path.iterdir()) == []


def test_a_failed_online_start_retries_offline_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[str] = []

    def fake_init(spec: WandbSpec, mode: str, *args: Any) -> Any:
        modes.append(mode)
        if mode == "online":
            raise TimeoutError("no network")
        return type("Run", (), {"id": "run42", "dir": str(tmp_path / "wandb" / "run" / "files")})()

    monkeypatch.setattr(wandb_logger, "_init", fake_init)
    reporter = CollectingReporter()
    logger = WandbLogger.start(
        WandbSpec(mode="online"), job_dir=tmp_path, config={}, run_id="run42", reporter=reporter
    )
    assert modes == ["online", "offline"] and logger.run_id == "run42"
    assert [(k, d["wandb_mode"]) for k, _, d in reporter.events] == [(EventKind.WARNING, "online")]


def test_a_failing_log_call_warns_once_and_never_raises() -> None:
    class BrokenRun:
        id, dir = "r", "/tmp/x/files"

        def log(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("gone")

    reporter = CollectingReporter()
    logger = WandbLogger(BrokenRun(), reporter)
    logger.log({"loss": 1.0}, 1)
    logger.log({"loss": 0.5}, 2)
    logger.finish()
    assert reporter.kinds() == [EventKind.WARNING] and not logger.enabled
