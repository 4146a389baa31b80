"""What TensorBoard shows a person: the graph, the confusion figure, PR curves, the training-batch grid
(feature cache on) and a predictions grid sampled across classes, mistakes first; read back from disk."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from imagefolders import job_spec, make_image_folder, one_thread
from PIL import Image

from service.records import EventKind
from service.settings import Settings
from service.spec import JobSpec
from service.training.reporting import CollectingReporter
from service.training.runner import train
from service.training.tb_figures import (
    BAND,
    RIGHT,
    TILE,
    WRONG,
    choose_preview,
    draw_predictions,
    tile_origin,
)


def _train(root: Path, spec: JobSpec) -> tuple[Path, CollectingReporter]:
    settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
    reporter = CollectingReporter()
    with one_thread():
        train(spec, root / "job", settings, reporter)
    return root / "job", reporter


def _events(path: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 0, "histograms": 1, "tensors": 0}
    accumulator = EventAccumulator(str(path), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def _picture(events: Any, tag: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)).convert("RGB"))


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, CollectingReporter, Any]]:
    """A 2-epoch, 3-colour job whose frozen prefix's outputs are cached (no augmentation, BN eval)."""
    root = tmp_path_factory.mktemp("cached")
    make_image_folder(root / "data" / "ds", classes=3, per_class=8)
    spec = job_spec(
        freeze={"depth": 3},
        training={"augmentation": "none", "feature_cache": True},
        logging={"tensorboard": True},
    )
    job_dir, reporter = _train(root, spec)
    yield job_dir, reporter, _events(job_dir / "tensorboard")


@pytest.mark.slow
def test_the_feature_cache_run_still_logs_the_training_batch(cached_run: Any) -> None:
    _, reporter, events = cached_run
    assert any(d.get("feature_cache") for k, _, d in reporter.events if k == EventKind.INFO)
    batches = events.Images("train/batch")
    assert [e.step for e in batches] == [1, 2]
    grid = np.asarray(Image.open(io.BytesIO(batches[0].encoded_image_string)))
    assert grid.std() > 10  # real, varied pixels, not a blank image


@pytest.mark.slow
def test_the_graph_of_the_trainable_part_is_logged(cached_run: Any) -> None:
    _, _, events = cached_run
    assert events.Tags()["graph"]
    ops = {node.op for node in events.Graph().node}
    assert "aten::linear" in ops  # the head is in it
    inputs = [n for n in events.Graph().node if n.op == "IO Node" and "input" in n.name]
    # fed the frozen prefix's output (channels of mobilenet_v3_small's third block), not 3-channel images
    (shape,) = inputs[0].attr["_output_shapes"].list.shape
    assert [d.size for d in shape.dim][:2] == [1, 24]


@pytest.mark.slow
def test_the_confusion_matrix_is_a_figure_every_epoch(cached_run: Any) -> None:
    _, _, events = cached_run
    figures = events.Images("val/confusion_matrix")
    assert [e.step for e in figures] == [1, 2]
    assert figures[0].width >= 300 and figures[0].height >= 300


@pytest.mark.slow
def test_the_prediction_grid_shows_several_classes_with_mistakes_first(cached_run: Any) -> None:
    _, _, events = cached_run
    picture = _picture(events, "val/predictions")
    bands, colours = [], []
    for i in range(16):
        x, y = tile_origin(i)
        if y + TILE + 2 < picture.shape[0]:
            band = tuple(int(v) for v in picture[y + TILE + 2, x + 2])
            if band in (RIGHT, WRONG):
                bands.append(band)
                colours.append(int(picture[y : y + TILE, x : x + TILE].reshape(-1, 3).mean(0).argmax()))
    assert len(bands) == 6  # the 6 validation images (3 classes x 8 x 0.25), each with a band
    assert bands == sorted(bands, key=lambda b: b != WRONG)  # the mistakes first
    assert len(set(colours)) == 3  # each class's dominant colour is in the grid


@pytest.mark.slow
@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_pr_curves_per_label(tmp_path: Path, task: str) -> None:
    classes = 2 if task == "binary" else 3
    make_image_folder(tmp_path / "data" / "ds", classes=classes, per_class=8)
    data: dict[str, Any] = {}
    if task == "multilabel":
        rows = ["path,labels"] + [
            f"ds/class_{c}/{i}.png,{'red' if c == 0 else 'green'}{';bright' if i % 2 else ''}"
            for c in range(3)
            for i in range(8)
        ]
        (tmp_path / "data" / "labels.csv").write_text("\n".join(rows) + "\n")
        data = {"manifest": "labels.csv"}
    spec = job_spec(task=task, data=data, training={"epochs": 1}, logging={"tensorboard": True})
    job_dir, _ = _train(tmp_path, spec)
    events = _events(job_dir / "tensorboard")
    expected = ["class_1"] if task == "binary" else ["bright", "green", "red"]
    tags = set(events.Tags()["tensors"])
    assert {f"val/pr_curve/{name}" for name in expected} <= tags
    assert not any(t.startswith("val/pr_curve/") and t[13:] not in expected for t in tags)
    curve = events.Tensors(f"val/pr_curve/{expected[0]}")[0]
    assert curve.step == 1
    assert events.SummaryMetadata(f"val/pr_curve/{expected[0]}").plugin_data.plugin_name == "pr_curves"


def test_choose_preview_puts_mistakes_first_and_covers_the_classes() -> None:
    targets = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10)  # validation order: by class
    predictions = targets.clone()
    predictions[[3, 4, 25]] = 1  # two mistakes in class 0, one in class 2
    chosen = choose_preview(predictions, targets, 8)
    assert chosen[:3] == [3, 25, 4]  # every mistake, one per class in turn
    assert {int(targets[i]) for i in chosen} == {0, 1, 2, 3}
    assert chosen[3:5] == [10, 30]  # classes the mistakes left out come next
    assert chosen == choose_preview(predictions, targets, 8)  # deterministic


def test_choose_preview_of_multilabel_rows_groups_by_first_true_label() -> None:
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    predictions = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]])
    assert choose_preview(predictions, targets, 3) == [3, 0, 2]


def test_prediction_grid_bands_are_red_for_wrong_and_green_for_right() -> None:
    picture = np.asarray(draw_predictions(torch.rand(3, 3, 28, 28), ["7", "1", "2"], ["7", "4", "2"]))
    origins = [tile_origin(i) for i in range(3)]
    band_colours = [tuple(int(v) for v in picture[y + TILE + 2, x + 2]) for x, y in origins]
    assert band_colours == [RIGHT, WRONG, RIGHT]
    x, y = origins[0]
    band = picture[y + TILE : y + TILE + BAND, x : x + TILE]
    text_rows = np.nonzero((band == 255).all(axis=2).any(axis=1))[0]
    assert text_rows.max() - text_rows.min() >= 12  # letters at least 12 px tall: readable
