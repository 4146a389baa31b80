"""train() end to end on a tiny torchvision model: events, checkpoints, exact resume, freezing, tasks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from imagefolders import job_spec, make_channel_labels, make_image_folder, one_thread, write_truncated_png
from sklearn.metrics import accuracy_score

from handlers.inference import ImageClassifier
from service.errors import DatasetError, FailedPrecondition, InvalidArgument
from service.records import EventKind
from service.settings import Settings
from service.spec import JobSpec, TrainingSpec
from service.tasks import task_for
from service.training.checkpoints import MODEL_CONFIG_KEYS, load_checkpoint, make_checkpoint
from service.training.gate_sample import gate_sample_for
from service.training.loaders import Batch
from service.training.loop import EpochPlan, evaluate, train_one_epoch
from service.training.optim import make_optimizer, make_scheduler, select_device
from service.training.reporting import CollectingReporter
from service.training.runner import TrainingOutcome, train
from service.training.steps import DevicePlan, Objective, Optimisation, Trainer


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "data" / "ds", classes=3, per_class=8)
    return tmp_path / "data"


def _settings(tmp_path: Path, data_root: Path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        data_root=data_root,
        torch_home=tmp_path / "torch",
        weights_root=tmp_path,
    )


def _train(spec: JobSpec, tmp_path: Path, data_root: Path, job: str = "job", reporter: Any = None) -> Any:
    reporter = reporter or CollectingReporter()
    outcome = train(spec, tmp_path / job, _settings(tmp_path, data_root), reporter)
    return outcome, reporter


def test_a_job_trains_checkpoints_and_reports(tmp_path: Path, data_root: Path) -> None:
    spec = job_spec(checkpointing={"keep_top_k": 2}, early_stopping={"enabled": False})
    outcome, reporter = _train(spec, tmp_path, data_root)

    assert isinstance(outcome, TrainingOutcome) and outcome.status == "completed"
    kinds = reporter.kinds()
    assert kinds.count(EventKind.EPOCH) == 2 and kinds.count(EventKind.CHECKPOINT) == 2
    assert kinds.index(EventKind.PROGRESS) < kinds.index(EventKind.EPOCH) < kinds.index(EventKind.CHECKPOINT)
    epoch = next(d for k, _, d in reporter.events if k == EventKind.EPOCH)
    assert {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= set(epoch)
    progress = next(d for k, _, d in reporter.events if k == EventKind.PROGRESS)
    assert set(progress) == {"epoch", "step", "steps", "loss", "lr", "images_per_s"}
    report = next(d for k, _, d in reporter.events if k == EventKind.INFO and d.get("report") == "per_class")
    assert len(report["confusion_matrix"]) == 3 and set(report["per_class"]) == {
        "class_0",
        "class_1",
        "class_2",
    }

    fields = reporter.fields
    assert fields["device"] == "cpu (fp32)" and fields["epochs_completed"] == 2
    assert fields["class_names"] == ("class_0", "class_1", "class_2") and fields["monitor"] == "val_loss"
    # the promotion gate's images: the whole validation split here (2 per class), as the spec recomputes it
    assert fields["gate_sample"] == gate_sample_for(spec, data_root) and len(fields["gate_sample"]) == 6
    assert Path(fields["best_checkpoint"]) == outcome.best_checkpoint == tmp_path / "job/checkpoints/best.pt"
    files = sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir())
    assert files == ["best.pt", "epoch-0001.pt", "epoch-0002.pt", "last.pt"]
    last = load_checkpoint(tmp_path / "job/checkpoints/last.pt")
    assert last["epoch"] == 2 and set(last["model_config"]) >= MODEL_CONFIG_KEYS
    assert last["model_config"]["image_size"] == 32 and last["model_config"]["num_classes"] == 3
    assert last["spec"] == spec.to_dict()


@dataclass
class StopInEpoch(CollectingReporter):
    """Asks to stop after `epochs` EPOCH events and one more training step."""

    epochs: int = 1
    polls: int = 0

    def stop_requested(self) -> str | None:
        if self.kinds().count(EventKind.EPOCH) < self.epochs:
            return None
        self.polls += 1
        return "cancelled" if self.polls > 1 else None


def _comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


def test_resume_after_a_stop_ends_exactly_like_an_uninterrupted_run(tmp_path: Path, data_root: Path) -> None:
    spec = job_spec(
        training={"epochs": 3, "augmentation": "standard", "scheduler": "cosine", "seed": 5},
        early_stopping={"enabled": False},
    )
    _train(spec, tmp_path, data_root, job="straight")

    stopped, _ = _train(spec, tmp_path, data_root, job="resumed", reporter=StopInEpoch(epochs=1))
    assert stopped.status == "stopped" and stopped.stop_reason == "cancelled"
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["epoch"] == 1
    resumed, reporter = _train(spec, tmp_path, data_root, job="resumed")
    assert resumed.status == "completed"
    assert any(k == EventKind.INFO and "resumed from" in m for k, m, _ in reporter.events)

    straight = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    again = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert _comparable(again["history"]) == _comparable(straight["history"])
    for key, tensor in straight["model"].items():
        assert torch.equal(again["model"][key], tensor), key
    assert again["step"] == straight["step"]


def _pretrained_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small()
    for module in model.modules():  # statistics unlike a fresh BatchNorm's, so a change would show
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pretrained.pth"
    torch.save(model.state_dict(), path)
    return path


def test_a_weights_file_job_resumes_when_its_file_is_now_outside_the_weights_root(
    tmp_path: Path, data_root: Path
) -> None:
    """A job admitted before the weights root existed (any path was allowed) must still resume: its
    tensors all come from its checkpoint, so the file is never read again."""
    spec = job_spec(
        model={
            "architecture": "mobilenet_v3_small",
            "weights": "file",
            "weights_file": str(_pretrained_file(tmp_path)),
        },
        training={"epochs": 2},
        early_stopping={"enabled": False},
    )
    stopped, _ = _train(spec, tmp_path, data_root, reporter=StopInEpoch(epochs=1))
    assert stopped.status == "stopped"
    (tmp_path / "new-root").mkdir()
    upgraded = _settings(tmp_path, data_root).model_copy(update={"weights_root": tmp_path / "new-root"})
    resumed = train(spec, tmp_path / "job", upgraded, CollectingReporter())
    assert resumed.status == "completed"


@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_frozen_blocks_keep_their_pretrained_tensors(tmp_path: Path, data_root: Path, batchnorm: str) -> None:
    pretrained_file = _pretrained_file(tmp_path)
    spec = job_spec(
        model={"architecture": "mobilenet_v3_small", "weights": "file", "weights_file": str(pretrained_file)},
        freeze={"until_layer": "features.12", "batchnorm": batchnorm},
        training={"epochs": 1, "lr": 0.05},
    )
    _train(spec, tmp_path, data_root)
    pretrained = torch.load(pretrained_file, weights_only=True)
    trained = load_checkpoint(tmp_path / "job/checkpoints/last.pt")["model"]
    frozen = {k: v for k, v in pretrained.items() if k.startswith("features.")}
    changed = [k for k, v in frozen.items() if not torch.equal(trained[k], v)]
    if batchnorm == "eval":
        assert changed == []
    else:  # BatchNorm statistics follow the new data; weights stay
        assert changed and all(
            k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed
        )
    assert not torch.equal(trained["classifier.0.weight"], pretrained["classifier.0.weight"])


def test_early_stopping_ends_the_job_and_says_why(tmp_path: Path, data_root: Path) -> None:
    spec = job_spec(training={"epochs": 5}, early_stopping={"patience": 1, "min_delta": 100.0})
    outcome, reporter = _train(spec, tmp_path, data_root)
    assert outcome.status == "completed" and reporter.fields["epochs_completed"] == 2
    assert outcome.stop_reason is not None and "did not improve" in outcome.stop_reason
    event = next(d for k, _, d in reporter.events if k == EventKind.EARLY_STOP)
    assert event["epoch"] == 2 and event["monitor"] == "val_loss" and event["patience"] == 1


def test_binary_task_trains_one_logit(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=12)
    spec = job_spec(task="binary", training={"epochs": 1, "max_steps_per_epoch": 1})
    _train(spec, tmp_path, tmp_path / "data")
    checkpoint = load_checkpoint(tmp_path / "job/checkpoints/last.pt")
    assert checkpoint["step"] == 1  # of 3 batches: max_steps_per_epoch holds
    assert checkpoint["model"]["classifier.3.weight"].shape[0] == 1
    assert checkpoint["model_config"]["num_classes"] == 1 and checkpoint["class_names"] == [
        "class_0",
        "class_1",
    ]


# Learning checks: timm/convnext_atto from random weights. It has LayerNorm, not BatchNorm, so what it
# learns in a few steps also holds in eval mode; a fresh mobilenet_v3_small answers one constant in eval
# mode on data this small (plain PyTorch does the same), which would only ever measure chance.
LEARNER = {"architecture": "timm/convnext_atto", "weights": "none"}
CHANCE_LOSS = math.log(2)  # BCE of always answering p = 0.5
LEARN = {"epochs": 3, "lr": 0.003}  # AdamW at the tests' usual 0.01 makes convnext_atto's first epochs jumpy


def _first_step_loss(reporter: CollectingReporter) -> float:
    """The loss of the first training step: the model's loss before it learned anything."""
    return float(next(d for k, _, d in reporter.events if k == EventKind.PROGRESS)["loss"])


def test_a_binary_job_separates_two_colours_above_chance(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=12)  # red and green
    make_image_folder(tmp_path / "data" / "val", classes=2, per_class=4, seed_offset=500)
    spec = job_spec(task="binary", model=LEARNER, data={"path": "ds", "val_path": "val"}, training=LEARN)
    _, reporter = _train(spec, tmp_path, tmp_path / "data")

    last = load_checkpoint(tmp_path / "job/checkpoints/last.pt")
    final = last["history"][-1]
    assert final["val_accuracy"] >= 0.875  # chance is 0.5; at most one of the 8 held-out images wrong
    assert final["val_loss"] < CHANCE_LOSS / 2
    assert final["train_loss"] < _first_step_loss(reporter) / 2
    # the reported accuracy is what the checkpoint really does on those images, counted by scikit-learn
    classifier = ImageClassifier.from_checkpoint(last)
    images = sorted((tmp_path / "data" / "val").glob("*/*.png"))
    answers = classifier.handle([image.read_bytes() for image in images])
    predicted = [answer[0]["label"] for answer in answers]  # type: ignore[index]
    truth = [image.parent.name for image in images]
    assert accuracy_score(truth, predicted) == pytest.approx(final["val_accuracy"])


def test_a_multilabel_job_learns_each_label_above_chance(tmp_path: Path) -> None:
    """Each label is one colour channel, on or off independently: learning only one label scores 0.75."""
    data_root = tmp_path / "data"
    rows = make_channel_labels(data_root, "ds", labels=("red", "blue"), per_combination=6)
    (data_root / "labels.csv").write_text("\n".join(["path,labels", *rows]) + "\n")
    spec = job_spec(
        task="multilabel", model=LEARNER, data={"path": "ds", "manifest": "labels.csv"}, training=LEARN
    )
    _, reporter = _train(spec, tmp_path, data_root)

    assert reporter.fields["class_names"] == ("blue", "red")
    final = load_checkpoint(tmp_path / "job/checkpoints/last.pt")["history"][-1]
    assert final["val_accuracy"] >= 0.9  # chance 0.5; one label learned, the other guessed: 0.75
    assert final["val_loss"] < CHANCE_LOSS / 2
    assert final["train_loss"] < _first_step_loss(reporter) / 2


def test_unusable_files_are_skipped_with_a_warning(tmp_path: Path, data_root: Path) -> None:
    (data_root / "ds" / "class_0" / "notes.txt").write_text("not an image")
    write_truncated_png(data_root / "ds" / "class_1" / "truncated.png")
    outcome, reporter = _train(job_spec(training={"epochs": 1}), tmp_path, data_root)
    assert outcome.status == "completed"
    warnings = [d for k, _, d in reporter.events if k == EventKind.WARNING]
    assert warnings[0]["skipped"] == 2
    assert warnings[0]["reasons"] == {"not an image file": 1, "cannot be decoded": 1}


def test_top5_monitor_needs_more_than_five_classes(tmp_path: Path, data_root: Path) -> None:
    spec = job_spec(early_stopping={"monitor": "val_top5_accuracy"})
    with pytest.raises(DatasetError, match="needs more than 5 classes; the dataset has 3"):
        _train(spec, tmp_path, data_root)


def test_an_unknown_optimizer_lists_the_valid_ones() -> None:
    training = TrainingSpec.model_construct(optimizer="lamb", lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"Invalid optimizer 'lamb'\. Only sgd, adam, adamw, rmsprop"):
        make_optimizer(training, [torch.nn.Parameter(torch.zeros(1))])


def test_no_trainable_parameter_is_an_error() -> None:
    with pytest.raises(InvalidArgument, match="no trainable parameter"):
        make_optimizer(TrainingSpec(), [])


def test_schedulers_step_per_step_or_per_epoch() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name, per_step in (("cosine", True), ("onecycle", True), ("step", False), ("none", False)):
        training = TrainingSpec.model_validate({"scheduler": name, "optimizer": "sgd"})
        _, stepped_per_step = make_scheduler(training, optimizer, 4)
        assert stepped_per_step is per_step, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_device_choice_on_a_cpu_machine() -> None:
    assert select_device(TrainingSpec()).describe() == "cpu (fp32)"
    assert select_device(TrainingSpec(precision="bf16")).autocast_dtype == torch.bfloat16
    with pytest.raises(InvalidArgument, match="'fp16' needs a CUDA device"):
        select_device(TrainingSpec(precision="fp16"))
    with pytest.raises(FailedPrecondition, match="sees no CUDA device"):
        select_device(TrainingSpec(device="cuda"))


def test_cached_frozen_features_train_like_images(tmp_path: Path, data_root: Path) -> None:
    def run(job: str, feature_cache: bool) -> tuple[list[dict[str, Any]], CollectingReporter]:
        spec = job_spec(
            freeze={"until_layer": "features.12"},
            # sgd: Adam's first steps amplify float noise (the prefix batches differently when cached)
            training={
                "epochs": 2,
                "augmentation": "none",
                "feature_cache": feature_cache,
                "optimizer": "sgd",
            },
        )
        _, reporter = _train(spec, tmp_path, data_root, job=job)
        return load_checkpoint(tmp_path / job / "checkpoints/last.pt")["history"], reporter

    cached, reporter = run("cached", True)
    images, plain = run("images", False)
    assert any(d.get("feature_cache") for k, _, d in reporter.events if k == EventKind.INFO)
    assert not any(d.get("feature_cache") for k, _, d in plain.events if k == EventKind.INFO)
    for a, b in zip(cached, images, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_cpu_optimizers_use_foreach_kernels() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    for name in ("sgd", "adam", "adamw", "rmsprop"):
        optimizer = make_optimizer(TrainingSpec(optimizer=name), params)
        assert optimizer.defaults["foreach"] is True, name
        assert not optimizer.defaults.get("fused"), name


def test_the_first_step_is_reported_at_once_then_at_most_once_a_period() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [Batch(torch.randn(2, 4), torch.tensor([0, 2]), []) for _ in range(4)]
    reporter = CollectingReporter()
    trainer = Trainer(
        model,
        Objective(task_for("multiclass"), torch.nn.CrossEntropyLoss(), num_classes=3),
        Optimisation(torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)),
        DevicePlan(torch.device("cpu")),
    )
    result = train_one_epoch(trainer, batches, EpochPlan(1), reporter, progress_every_s=3600.0)  # type: ignore[arg-type]
    assert result.steps == 4
    # step 1 tells a watcher training has begun (the job-latency benchmark reads it); step 4 ends the epoch
    assert [d["step"] for k, _, d in reporter.events if k == EventKind.PROGRESS] == [1, 4]


@pytest.mark.parametrize("task_name", ["binary", "multilabel"])
def test_training_and_validation_accuracy_decide_at_the_jobs_threshold(task_name: str) -> None:
    """The loop's accuracy, at the job's threshold, against a plain sigmoid > threshold on the same logits
    (lr 0: the weights never move, so the logits the loop judged are the model's on the same images)."""
    torch.manual_seed(3)
    labels = 1 if task_name == "binary" else 3
    model = torch.nn.Linear(4, labels)
    images = torch.randn(4, 6, 4)  # 4 batches of 6
    targets = torch.randint(0, 2, (4, 6) if task_name == "binary" else (4, 6, labels))
    batches = [
        Batch(x, y if task_name == "binary" else y.float(), []) for x, y in zip(images, targets, strict=True)
    ]
    task = task_for(task_name)

    def judged(threshold: float) -> tuple[float, float, list[float]]:
        objective = Objective(task, task.criterion(), num_classes=labels, threshold=threshold)
        optimisation = Optimisation(
            torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler("cpu", enabled=False)
        )
        trainer = Trainer(model, objective, optimisation, DevicePlan(torch.device("cpu")))
        logged: list[float] = []
        trained = train_one_epoch(
            trainer, batches, EpochPlan(1), CollectingReporter(),  # type: ignore[arg-type]
            log_step=lambda values, _step: logged.append(values["train/accuracy"]),
        )  # fmt: skip
        validated = evaluate(model, batches, objective, trainer.device)  # type: ignore[arg-type]
        return trained.metrics["accuracy"], validated.metrics["accuracy"], logged

    with torch.no_grad():
        probabilities = torch.sigmoid(model(images.reshape(-1, 4)))
    truth = targets.reshape(len(probabilities), labels)

    def plain(threshold: float) -> float:
        return ((probabilities > threshold).long() == truth).double().mean().item()

    # the two thresholds differ by at least one decision of 24 x labels; the tolerance only absorbs the
    # float32 per-image means of multilabel
    assert abs(plain(0.3) - plain(0.5)) >= 1 / (24 * labels)
    for threshold in (0.3, 0.5):
        trained, validated, per_step = judged(threshold)
        assert trained == pytest.approx(plain(threshold), abs=1e-6), threshold
        assert validated == pytest.approx(plain(threshold), abs=1e-6), threshold
        assert sum(per_step) / len(per_step) == pytest.approx(plain(threshold), abs=1e-6), threshold


def test_a_resume_onto_a_dataset_whose_classes_changed_is_refused_before_anything_starts(
    tmp_path: Path, data_root: Path
) -> None:
    spec = job_spec(logging={"tensorboard": True})
    last = tmp_path / "job" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    model_config = {key: None for key in MODEL_CONFIG_KEYS}  # never read: the classes are checked first
    torch.save(
        make_checkpoint(
            model={}, optimizer={}, scheduler=None, scaler={}, epoch=1, step=3, history=[], early_stopping={},
            rng={}, spec=spec.to_dict(), class_names=["class_0", "class_1"], wandb_run_id=None, metrics={},
            model_config=model_config,
        ),
        last,
    )  # fmt: skip
    reporter = CollectingReporter()
    with pytest.raises(
        FailedPrecondition, match=r"has classes \['class_0', 'class_1'\], but the job's dataset"
    ):
        train(spec, tmp_path / "job", _settings(tmp_path, data_root), reporter)
    assert reporter.events == []
    assert not (
        tmp_path / "job" / "tensorboard"
    ).exists()  # no logger was opened for a job that cannot resume
