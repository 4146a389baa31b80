"""What a task type means, in one object per task: multiclass, binary, multilabel.

A strategy says how wide the head is, which loss trains it, how a sample's label becomes a target
tensor, how logits become decisions and probabilities, how probabilities become the labels a served
model answers, and which class sets a dataset may have. Training, admission, the spec and the
TorchServe handler all ask it; adding a task is a new class here and a row in TASKS.

- multiclass: one logit per class, CrossEntropy (with label smoothing), accuracy = top-1, plus
  `top5_accuracy` when there are more than 5 classes.
- binary: ONE logit, the positive class is `class_names[1]` (the second folder in sorted order);
  BCEWithLogits; predicted positive when sigmoid(logit) > threshold.
- multilabel: one logit per label, BCEWithLogits; accuracy is the mean over all (image, label)
  decisions; samples come from a CSV manifest, and a validation set may hold a subset of the labels.

torch is imported inside the tensor methods, not here: the spec and admission import this module in
the server process, which must not pay for importing torch at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from service.errors import DatasetError, InvalidArgument

if TYPE_CHECKING:
    from torch import Tensor, nn

TaskName = Literal["multiclass", "binary", "multilabel"]
TOP_K = 5  # the top-k accuracy multiclass reports when it has more classes than this
Target = int | tuple[int, ...]  # a sample's label: a class index, or (multilabel) its label indices


class TaskStrategy(Protocol):
    """Everything that differs between task types (see the module docstring)."""

    name: TaskName
    reads_manifest: bool  # samples come from data.manifest (a CSV), not from class folders
    label_smoothing: bool  # training.label_smoothing applies
    val_subset_ok: bool  # a separate validation set may hold a subset of the classes
    top_k_metric: bool  # reports `top5_accuracy` (with more than TOP_K classes)
    answers_are_sets: bool  # a served answer is every label over the threshold, not a ranking

    def output_units(self, num_classes: int) -> int: ...
    def check_class_count(self, class_names: Sequence[str], where: str) -> None: ...
    def check_val_classes(self, train: Sequence[str], val: Sequence[str]) -> None: ...
    def has_top_k(self, num_classes: int) -> bool: ...
    def criterion(self, label_smoothing: float = 0.0) -> nn.Module: ...
    def target(self, label: Target, num_classes: int) -> Tensor: ...
    def loss_targets(self, targets: Tensor) -> Tensor: ...
    def predict(self, logits: Tensor, threshold: float = 0.5) -> Tensor: ...
    def hits(self, predictions: Tensor, targets: Tensor) -> float: ...
    def probabilities(self, logits: Tensor) -> Tensor: ...
    def pr_scores(self, logits: Tensor) -> Tensor | None: ...
    def pr_curves(
        self, class_names: Sequence[str], targets: Tensor, scores: Tensor
    ) -> list[tuple[str, Tensor, Tensor]]: ...
    def label(
        self, probs: Tensor, class_names: Sequence[str], threshold: float, top_k: int
    ) -> list[tuple[str, float]]: ...
    def margin(
        self, answer: Sequence[tuple[str, float]], class_names: Sequence[str], threshold: float
    ) -> float:
        """How far a served answer's decision is from changing (the promotion gate's near-tie rule)."""


class _Task:
    val_subset_ok = False
    answers_are_sets = False

    def margin(
        self, answer: Sequence[tuple[str, float]], class_names: Sequence[str], threshold: float
    ) -> float:
        """Ranked answers: the top-1's lead over the top-2 (no runner-up: nothing can flip)."""
        if len(answer) < 2:
            return math.inf
        return answer[0][1] - answer[1][1]

    def check_val_classes(self, train: Sequence[str], val: Sequence[str]) -> None:
        """A separate validation set has the training classes (a subset where `val_subset_ok`)."""
        missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        if extra or (missing and not self.val_subset_ok):
            raise DatasetError(
                f"data.val_path has different classes from data.path: missing in val {missing}, only in "
                f"val {extra}; give both the same class folders"
            )


class _FolderTask(_Task):
    """What multiclass and binary share: class folders and one class index per image."""

    reads_manifest = False
    top_k_metric = False
    min_classes = 2

    def check_class_count(self, class_names: Sequence[str], where: str) -> None:
        if len(class_names) < self.min_classes:
            raise DatasetError(
                f"dataset folder {where!r} has a single class folder ({class_names[0]!r}); a classifier "
                "needs at least 2 classes: add a folder per class"
            )

    def target(self, label: Target, num_classes: int) -> Tensor:
        import torch

        return torch.tensor(label)

    def hits(self, predictions: Tensor, targets: Tensor) -> float:
        return float((predictions == targets.long()).sum().item())


class _Sigmoid:
    """Independent sigmoid outputs (binary's one logit, multilabel's one per label)."""

    def probabilities(self, logits: Tensor) -> Tensor:
        import torch

        return torch.sigmoid(logits.float())

    def pr_scores(self, logits: Tensor) -> Tensor | None:
        return self.probabilities(logits).reshape(len(logits), -1)


class Multiclass(_FolderTask):
    name: TaskName = "multiclass"
    label_smoothing = True
    top_k_metric = True

    def output_units(self, num_classes: int) -> int:
        return num_classes

    def has_top_k(self, num_classes: int) -> bool:
        return num_classes > TOP_K  # with 5 or fewer classes the top-5 accuracy is always 1

    def criterion(self, label_smoothing: float = 0.0) -> nn.Module:
        from torch import nn

        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_targets(self, targets: Tensor) -> Tensor:
        return targets.long()

    def predict(self, logits: Tensor, threshold: float = 0.5) -> Tensor:
        return logits.argmax(dim=1)

    def probabilities(self, logits: Tensor) -> Tensor:
        import torch

        return torch.softmax(logits.float(), dim=1)

    def pr_scores(self, logits: Tensor) -> Tensor | None:
        return None  # no PR curves: a softmax ranks the classes against each other

    def pr_curves(
        self, class_names: Sequence[str], targets: Tensor, scores: Tensor
    ) -> list[tuple[str, Tensor, Tensor]]:
        return []

    def label(
        self, probs: Tensor, class_names: Sequence[str], threshold: float, top_k: int
    ) -> list[tuple[str, float]]:
        import torch

        values, indices = torch.topk(probs, min(top_k, len(class_names)))
        return [(class_names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


class Binary(_Sigmoid, _FolderTask):
    name: TaskName = "binary"
    label_smoothing = False

    def output_units(self, num_classes: int) -> int:
        return 1  # one logit, for class_names[1]

    def check_class_count(self, class_names: Sequence[str], where: str) -> None:
        if len(class_names) != 2:
            raise DatasetError(
                f"task 'binary' needs exactly 2 class folders in {where!r}, found {len(class_names)} "
                f"({', '.join(class_names)}); the second in sorted order is the positive class"
            )

    def has_top_k(self, num_classes: int) -> bool:
        return False

    def criterion(self, label_smoothing: float = 0.0) -> nn.Module:
        from torch import nn

        return nn.BCEWithLogitsLoss()

    def loss_targets(self, targets: Tensor) -> Tensor:
        return targets.float().reshape(-1, 1)

    def predict(self, logits: Tensor, threshold: float = 0.5) -> Tensor:
        import torch

        return (torch.sigmoid(logits.float()) > threshold).reshape(-1).long()

    def pr_curves(
        self, class_names: Sequence[str], targets: Tensor, scores: Tensor
    ) -> list[tuple[str, Tensor, Tensor]]:
        """One curve, of the positive class: its 0/1 truths against the one logit's probability."""
        return [(class_names[1], targets, scores[:, 0])]

    def label(
        self, probs: Tensor, class_names: Sequence[str], threshold: float, top_k: int
    ) -> list[tuple[str, float]]:
        """Both classes, the decision by the threshold first."""
        positive = float(probs[0])
        pairs = [(class_names[1], positive), (class_names[0], 1.0 - positive)]
        if not positive > threshold:
            pairs.reverse()
        return pairs[:top_k]

    def margin(
        self, answer: Sequence[tuple[str, float]], class_names: Sequence[str], threshold: float
    ) -> float:
        """The positive class's distance from the threshold (not answered: nothing to flip)."""
        positive = next((p for label, p in answer if label == class_names[1]), None)
        return math.inf if positive is None else abs(positive - threshold)


class Multilabel(_Sigmoid, _Task):
    name: TaskName = "multilabel"
    reads_manifest = True
    answers_are_sets = True
    label_smoothing = False
    val_subset_ok = True  # a validation manifest need not use every label
    top_k_metric = False

    def output_units(self, num_classes: int) -> int:
        return num_classes

    def check_class_count(self, class_names: Sequence[str], where: str) -> None:
        if not class_names:
            raise DatasetError(f"data.manifest {where!r} names no labels; rows are `path,label1;label2`")

    def has_top_k(self, num_classes: int) -> bool:
        return False

    def criterion(self, label_smoothing: float = 0.0) -> nn.Module:
        from torch import nn

        return nn.BCEWithLogitsLoss()

    def target(self, label: Target, num_classes: int) -> Tensor:
        import torch

        multi_hot = torch.zeros(num_classes)
        multi_hot[list(label if isinstance(label, tuple) else (label,))] = 1.0
        return multi_hot

    def loss_targets(self, targets: Tensor) -> Tensor:
        return targets.float()

    def predict(self, logits: Tensor, threshold: float = 0.5) -> Tensor:
        import torch

        return (torch.sigmoid(logits.float()) > threshold).long()

    def hits(self, predictions: Tensor, targets: Tensor) -> float:
        return float((predictions == targets.long()).float().mean(dim=1).sum().item())

    def pr_curves(
        self, class_names: Sequence[str], targets: Tensor, scores: Tensor
    ) -> list[tuple[str, Tensor, Tensor]]:
        """One curve per label."""
        return [(name, targets[:, c], scores[:, c]) for c, name in enumerate(class_names)]

    def label(
        self, probs: Tensor, class_names: Sequence[str], threshold: float, top_k: int
    ) -> list[tuple[str, float]]:
        """Every label over the threshold, most likely first (top_k does not cut them)."""
        import torch

        order = torch.argsort(probs, descending=True, stable=True).tolist()
        return [(class_names[i], float(probs[i])) for i in order if float(probs[i]) > threshold]


TASKS: dict[str, TaskStrategy] = {"multiclass": Multiclass(), "binary": Binary(), "multilabel": Multilabel()}
assert set(TASKS) == set(get_args(TaskName)), "every task name has a strategy"


def task_for(name: str) -> TaskStrategy:
    """The strategy of task `name`; InvalidArgument listing the tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise InvalidArgument(f"task {name!r} is unknown; allowed: {', '.join(TASKS)}") from None


def tasks_where(flag: str) -> str:
    """The tasks whose strategy sets `flag`, as a spec message names them: 'multilabel' or ..."""
    return " or ".join(f"task={name!r}" for name, task in TASKS.items() if getattr(task, flag))
