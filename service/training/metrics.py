"""What each epoch reports (loss, accuracy, top-5) and the per-class report at the end of training.

What a task's outputs, loss and decisions are is its strategy's (service.tasks); this module counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.tasks import TOP_K, TaskStrategy


@dataclass(frozen=True)
class ClassReport:
    """Per-class precision/recall/F1/support and the confusion matrix, for the end of training.

    `confusion` is [true][predicted] counts for multiclass and binary; for multilabel it is one
    [[tn, fp], [fn, tp]] matrix per label.
    """

    class_names: tuple[str, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: list[Any]

    @property
    def macro_f1(self) -> float:
        return sum(self.f1) / len(self.f1) if self.f1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        per_class = {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, p, r, f, s in zip(
                self.class_names, self.precision, self.recall, self.f1, self.support, strict=True
            )
        }
        return {"per_class": per_class, "macro_f1": self.macro_f1, "confusion_matrix": self.confusion}

    def as_markdown(self) -> str:
        lines = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for name, p, r, f, s in zip(
            self.class_names, self.precision, self.recall, self.f1, self.support, strict=True
        ):
            lines.append(f"| {name} | {p:.4f} | {r:.4f} | {f:.4f} | {s} |")
        lines.append(f"\nmacro F1: {self.macro_f1:.4f}\n\nconfusion matrix: `{self.confusion}`")
        return "\n".join(lines)


class MetricAccumulator:
    """Sums loss and hits over batches: `compute()` gives the epoch's metrics, `report()` per-class ones."""

    def __init__(self, task: TaskStrategy, num_classes: int, threshold: float = 0.5) -> None:
        self.task = task
        self.num_classes = num_classes
        self.threshold = threshold
        self._loss_sum = 0.0
        self._count = 0
        self._hits = 0.0
        self._top_k_hits = 0
        self._predictions: list[Tensor] = []
        self._targets: list[Tensor] = []

    @property
    def has_top_k(self) -> bool:
        return self.task.has_top_k(self.num_classes)

    @property
    def count(self) -> int:
        return self._count

    def update(self, loss: float, logits: Tensor, targets: Tensor) -> float:
        """Add one batch (`loss` is its mean loss, `targets` as the dataset gives them); its accuracy."""
        logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
        n = targets.shape[0]
        predictions = self.task.predict(logits, self.threshold)
        hits = self.task.hits(predictions, targets)
        self._loss_sum += loss * n
        self._count += n
        self._hits += hits
        if self.has_top_k:
            top = logits.topk(TOP_K, dim=1).indices
            self._top_k_hits += int((top == targets.long().unsqueeze(1)).any(dim=1).sum().item())
        self._predictions.append(predictions)
        self._targets.append(targets.long())
        return hits / n if n else math.nan

    def compute(self) -> dict[str, float]:
        """`loss`, `accuracy` and, for multiclass with more than 5 classes, `top5_accuracy`."""
        if self._count == 0:
            return {"loss": math.nan, "accuracy": math.nan}
        metrics = {"loss": self._loss_sum / self._count, "accuracy": self._hits / self._count}
        if self.has_top_k:
            metrics["top5_accuracy"] = self._top_k_hits / self._count
        return metrics

    def report(self, class_names: tuple[str, ...]) -> ClassReport:
        """Per-class precision, recall, F1, support and the confusion matrix of everything seen."""
        predictions = torch.cat(self._predictions) if self._predictions else torch.zeros(0, dtype=torch.long)
        targets = torch.cat(self._targets) if self._targets else torch.zeros(0, dtype=torch.long)
        if predictions.dim() == 2:  # one 0/1 column per label (multilabel)
            tp = (predictions * targets).sum(dim=0)
            fp = (predictions * (1 - targets)).sum(dim=0)
            fn = ((1 - predictions) * targets).sum(dim=0)
            tn = ((1 - predictions) * (1 - targets)).sum(dim=0)
            confusion: list[Any] = [
                [[int(tn[c]), int(fp[c])], [int(fn[c]), int(tp[c])]] for c in range(self.num_classes)
            ]
        else:
            matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
            matrix.index_put_((targets, predictions), torch.ones_like(targets), accumulate=True)
            tp, fp, fn = matrix.diag(), matrix.sum(dim=0) - matrix.diag(), matrix.sum(dim=1) - matrix.diag()
            confusion = matrix.tolist()
        precision = _safe_ratio(tp, tp + fp)
        recall = _safe_ratio(tp, tp + fn)
        f1 = tuple(2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True))
        return ClassReport(
            class_names=tuple(class_names),
            precision=precision,
            recall=recall,
            f1=f1,
            support=tuple(int(s) for s in tp + fn),
            confusion=confusion,
        )


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> tuple[float, ...]:
    # 0 where the denominator is 0, as scikit-learn's zero_division=0 does
    return tuple(float(n) / float(d) if d else 0.0 for n, d in zip(numerator, denominator, strict=True))
