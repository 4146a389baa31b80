"""TensorBoard and W&B logs of a real (tiny) run, read back from disk; W&B never stops training."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagefolders import job_spec, make_image_folder, one_thread

from service.records import EventKind
from service.settings import Settings
from service.spec import WandbSpec
from service.training import wandb_logger
from service.training.checkpoints import load_checkpoint
from service.training.reporting import CollectingReporter
from service.training.runner import train
from service.training.wandb_logger import WandbLogger, resolve_mode
from tests.wandb_files import read_wandb_records


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
        try:
            train(spec, root / "job", settings, reporter)
        finally:
            _wandb_teardown()
    yield root / "job", reporter


def _wandb_teardown() -> None:
    """What a worker's exit does (service.worker_app.exit_now runs the atexit handlers, W&B's among them):
    wandb-core writes the run file's last records after finish() has returned, and stops only then."""
    import wandb

    wandb.teardown()


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
    warnings = [d["wandb_mode"] for k, _, d in reporter.events if k == EventKind.WARNING]
    assert warnings == ["online"]


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


CRASHING_JOB = """
import sys, time
from pathlib import Path
from imagefolders import job_spec
from service.records import EventKind
from service.settings import Settings
from service.training.reporting import CollectingReporter
from service.training.runner import train

class HangsAfterEpochOne(CollectingReporter):
    def stop_requested(self):
        while any(k == EventKind.CHECKPOINT for k, _, _ in self.events):
            time.sleep(1)  # epoch 1 is checkpointed and logged: wait here for the SIGKILL
        return None

root = Path(sys.argv[1])
spec = job_spec(training={"epochs": 3}, logging={"wandb": {"mode": "offline", "project": "resume"}})
settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
train(spec, root / "job", settings, HangsAfterEpochOne())
"""


def _epoch_one_on_disk(job_dir: Path) -> bool:
    """Whether wandb has written epoch 1's row to the offline run's file (it buffers for seconds)."""
    folders = list((job_dir / "wandb").glob("offline-run-*"))
    if len(folders) != 1 or not list(folders[0].glob("run-*.wandb")):
        return False
    try:
        history = read_wandb_records(folders[0])["history"]
    except Exception:  # a record half written: look again
        return False
    return any(row.get("epoch") == 1 for row in history)


def _run_id(run_dir: Path) -> str:
    from wandb.proto import wandb_internal_pb2

    records = read_wandb_records(run_dir, keep_records=True)["records"]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert isinstance(run, wandb_internal_pb2.RunRecord)
    return str(run.run_id)


@pytest.mark.slow
def test_an_offline_job_resumed_after_a_crash_continues_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    make_image_folder(tmp_path / "data" / "ds", classes=3, per_class=6)
    job_dir = tmp_path / "job"
    tests_unit = Path(__file__).parent
    # WANDB_SERVICE: wandb hands its service to child processes; a job worker starts its own
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests_unit.parents[1]), str(tests_unit)])
    crashing = subprocess.Popen([sys.executable, "-c", CRASHING_JOB, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 180  # wandb-core writes its file every few seconds
        while not _epoch_one_on_disk(job_dir):
            assert crashing.poll() is None and time.monotonic() < deadline, "epoch 1 never reached W&B's file"
            time.sleep(1)
    finally:
        crashing.kill()  # the crash: no wandb.finish(), no flush
        crashing.wait()
    run_id = load_checkpoint(job_dir / "checkpoints" / "last.pt")["wandb_run_id"]

    spec = job_spec(training={"epochs": 3}, logging={"wandb": {"mode": "offline", "project": "resume"}})
    settings = Settings(state_dir=tmp_path / "state", data_root=tmp_path / "data", torch_home=tmp_path / "t")
    reporter = CollectingReporter()
    with one_thread():
        try:
            train(spec, job_dir, settings, reporter)
        finally:
            _wandb_teardown()

    first, second = wandb_logger.offline_parts(job_dir, run_id)
    assert reporter.fields["wandb_run_id"] == run_id and _run_id(first) == _run_id(second) == run_id
    kinds = {r.WhichOneof("record_type") for r in read_wandb_records(second, keep_records=True)["records"]}
    assert "exit" in kinds  # the resumed part is complete: it ran to its end
    before, after = read_wandb_records(first)["history"], read_wandb_records(second)["history"]
    steps_per_epoch = next(row["epoch/steps"] for row in before if row.get("epoch") == 1)
    assert [r["_step"] for r in before if "train/loss" in r] == list(range(1, steps_per_epoch + 1))
    total = load_checkpoint(job_dir / "checkpoints" / "last.pt")["step"]
    assert [r["_step"] for r in after if "train/loss" in r] == list(range(steps_per_epoch + 1, total + 1))
    assert [r["epoch"] for r in before + after if "epoch" in r] == [1, 2, 3]

    (told,) = [d for k, _, d in reporter.events if k == EventKind.INFO and "wandb_sync_command" in d]
    command = shlex.split(told["wandb_sync_command"])
    assert command == ["wandb", "sync", "--id", run_id, str(first), str(second)]
    # wandb's own CLI accepts it and would upload both parts (a dry run needs no network or login)
    wandb_cli = Path(sys.executable).with_name("wandb")
    dry = subprocess.run(
        [str(wandb_cli), "sync", "--dry-run", *command[2:]], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "Would sync 2 run(s)" in dry.stdout + dry.stderr
