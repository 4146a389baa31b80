"""Each task strategy against a plain PyTorch computation on a tiny model (service.tasks)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from service.errors import DatasetError, InvalidArgument
from service.spec import Task
from service.tasks import TASKS, task_for

CLASSES = ("cat", "dog", "fox")


def tiny_model(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, outputs))


def test_every_task_name_the_spec_accepts_has_a_strategy_and_no_other() -> None:
    assert set(get_args(Task)) == set(TASKS)
    with pytest.raises(InvalidArgument, match="task 'regression' is unknown; allowed: multiclass, binary"):
        task_for("regression")


def test_multiclass_trains_one_logit_per_class_with_cross_entropy_and_answers_the_top_k() -> None:
    task = task_for("multiclass")
    model = tiny_model(task.output_units(len(CLASSES)))
    images, labels = torch.randn(4, 3, 2, 2), [0, 2, 1, 2]
    targets = torch.stack([task.target(label, len(CLASSES)) for label in labels])
    logits = model(images)
    assert logits.shape == (4, 3)
    loss = task.criterion(label_smoothing=0.1)(logits, task.loss_targets(targets))
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1))
    assert task.predict(logits).tolist() == logits.argmax(1).tolist()
    probs = task.probabilities(logits)
    assert torch.allclose(probs, torch.softmax(logits, 1))
    answer = task.label(probs[0], CLASSES, threshold=0.5, top_k=2)
    best = probs[0].argsort(descending=True)[:2].tolist()
    assert [name for name, _ in answer] == [CLASSES[i] for i in best]
    assert task.pr_scores(logits) is None and not task.has_top_k(5) and task.has_top_k(6)


def test_binary_trains_one_logit_for_the_second_class_with_bce() -> None:
    task = task_for("binary")
    assert task.output_units(2) == 1
    model = tiny_model(1)
    images, labels = torch.randn(4, 3, 2, 2), [0, 1, 1, 0]
    targets = torch.stack([task.target(label, 2) for label in labels])
    logits = model(images)
    loss = task.criterion()(logits, task.loss_targets(targets))
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float).view(-1, 1))
    assert torch.allclose(loss, expected)
    assert task.predict(logits, threshold=0.3).tolist() == (torch.sigmoid(logits)[:, 0] > 0.3).long().tolist()
    positive = torch.tensor([0.7])
    assert task.label(positive, ("no", "yes"), threshold=0.5, top_k=2) == [
        ("yes", pytest.approx(0.7)),
        ("no", pytest.approx(0.3)),
    ]
    assert task.label(positive, ("no", "yes"), threshold=0.8, top_k=1) == [("no", pytest.approx(0.3))]
    [(name, _truths, scores)] = task.pr_curves(
        ("no", "yes"), torch.tensor([0, 1]), torch.tensor([[0.2], [0.9]])
    )
    assert name == "yes" and scores.tolist() == pytest.approx([0.2, 0.9])


def test_multilabel_trains_one_logit_per_label_on_multi_hot_targets() -> None:
    task = task_for("multilabel")
    model = tiny_model(task.output_units(len(CLASSES)))
    images, labels = torch.randn(2, 3, 2, 2), [(0, 2), (1,)]
    targets = torch.stack([task.target(label, len(CLASSES)) for label in labels])
    assert targets.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    logits = model(images)
    loss = task.criterion()(logits, task.loss_targets(targets))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, targets))
    assert task.predict(logits, 0.4).tolist() == (torch.sigmoid(logits) > 0.4).long().tolist()
    answer = task.label(torch.tensor([0.6, 0.1, 0.9]), CLASSES, threshold=0.5, top_k=1)
    assert answer == [("fox", pytest.approx(0.9)), ("cat", pytest.approx(0.6))]  # top_k never cuts labels
    hits = task.hits(torch.tensor([[1, 0, 1], [1, 1, 1]]), targets)
    assert hits == pytest.approx(1.0 + 1 / 3)


def test_class_sets_each_task_accepts() -> None:
    with pytest.raises(DatasetError, match="task 'binary' needs exactly 2 class folders"):
        task_for("binary").check_class_count(CLASSES, "ds")
    with pytest.raises(DatasetError, match="has a single class folder"):
        task_for("multiclass").check_class_count(("cat",), "ds")
    task_for("multiclass").check_class_count(CLASSES, "ds")
    # a validation manifest may use a subset of the labels; validation folders may not
    task_for("multilabel").check_val_classes(CLASSES, CLASSES[:2])
    with pytest.raises(DatasetError, match=r"missing in val \['fox'\]"):
        task_for("multiclass").check_val_classes(CLASSES, CLASSES[:2])
    with pytest.raises(DatasetError, match=r"only in val \['owl'\]"):
        task_for("multilabel").check_val_classes(CLASSES, ("cat", "owl"))
