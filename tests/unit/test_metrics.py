"""Loss and metrics per task, and the per-class report against scikit-learn."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix, precision_recall_fscore_support
from torch.nn import functional as F

from service.tasks import task_for
from service.training.metrics import MetricAccumulator


def test_multiclass_loss_is_cross_entropy_with_label_smoothing() -> None:
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    criterion = task_for("multiclass").criterion(label_smoothing=0.1)
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert torch.allclose(criterion(logits, task_for("multiclass").loss_targets(targets)), expected)


def test_binary_uses_one_logit_and_bce() -> None:
    assert task_for("binary").output_units(2) == 1
    logits, targets = torch.randn(5, 1), torch.tensor([0, 1, 1, 0, 1])
    loss = task_for("binary").criterion()(logits, task_for("binary").loss_targets(targets))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, targets.float().view(-1, 1)))
    assert task_for("binary").predict(torch.tensor([[2.0], [-2.0]]), threshold=0.5).tolist() == [1, 0]


def test_multilabel_uses_bce_per_label() -> None:
    assert task_for("multilabel").output_units(3) == 3
    logits, targets = torch.randn(4, 3), torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]).float()
    loss = task_for("multilabel").criterion()(logits, task_for("multilabel").loss_targets(targets))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, targets))


def test_multilabel_accuracy_is_the_mean_over_labels() -> None:
    accumulator = MetricAccumulator(task_for("multilabel"), 3, threshold=0.5)
    logits = torch.tensor([[5.0, -5.0, 5.0], [5.0, 5.0, -5.0]])  # predicts [1,0,1], [1,1,0]
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # 2/3 and 3/3 right
    accumulator.update(0.5, logits, targets)
    assert accumulator.compute()["accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_loss_is_averaged_over_images_not_batches() -> None:
    accumulator = MetricAccumulator(task_for("multiclass"), 3)
    accumulator.update(1.0, torch.randn(3, 3), torch.tensor([0, 1, 2]))
    accumulator.update(4.0, torch.randn(1, 3), torch.tensor([0]))
    assert accumulator.compute()["loss"] == pytest.approx((1.0 * 3 + 4.0) / 4)


def test_top5_only_with_more_than_five_classes() -> None:
    few = MetricAccumulator(task_for("multiclass"), 5)
    few.update(1.0, torch.randn(2, 5), torch.tensor([0, 1]))
    assert "top5_accuracy" not in few.compute()

    many = MetricAccumulator(task_for("multiclass"), 8)
    logits = torch.arange(8.0).repeat(2, 1)  # ranking 7 > 6 > ... > 0
    many.update(1.0, logits, torch.tensor([3, 2]))  # 3 is in the top 5, 2 is not
    metrics = many.compute()
    assert metrics["top5_accuracy"] == 0.5
    assert metrics["accuracy"] == 0.0


def test_report_matches_scikit_learn() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(40, 4), torch.randint(0, 4, (40,))
    accumulator = MetricAccumulator(task_for("multiclass"), 4)
    accumulator.update(1.0, logits[:25], targets[:25])
    accumulator.update(1.0, logits[25:], targets[25:])
    report = accumulator.report(("a", "b", "c", "d"))

    predicted = logits.argmax(1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        targets.numpy(), predicted, labels=[0, 1, 2, 3], zero_division=0
    )
    assert report.precision == pytest.approx(list(precision))
    assert report.recall == pytest.approx(list(recall))
    assert report.f1 == pytest.approx(list(f1))
    assert list(report.support) == list(support)
    assert report.confusion == confusion_matrix(targets.numpy(), predicted, labels=[0, 1, 2, 3]).tolist()
    assert set(report.as_dict()["per_class"]) == {"a", "b", "c", "d"}


def test_multilabel_report_has_one_confusion_matrix_per_label() -> None:
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]]).float()
    logits = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, 3.0], [3.0, -3.0]])
    accumulator = MetricAccumulator(task_for("multilabel"), 2)
    accumulator.update(0.1, logits, targets)
    report = accumulator.report(("x", "y"))
    predicted = (logits > 0).long().numpy()
    assert report.confusion == multilabel_confusion_matrix(targets.long().numpy(), predicted).tolist()
