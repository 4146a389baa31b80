"""TensorBoard adapter: scalars, histograms, the model graph, image grids, figures, PR curves, the
embedding projector, hparams, text.

TensorBoard is imported when a logger is opened, not when this module is. Everything is written under
`<job_dir>/tensorboard`; `add_hparams` writes its own run in the `hparams` sub-folder. What the images
and figures show is decided in service.training.tb_figures.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.training.tb_figures import draw_predictions

log = logging.getLogger(__name__)

MAX_GRID_IMAGES = 32
THUMBNAIL = 32  # px, the projector's sprite images
HParam = bool | str | float | int | None


class TensorBoardLogger:
    """Writes one job's TensorBoard logs; a logger opened with enabled=False does nothing."""

    def __init__(self, log_dir: Path, *, enabled: bool = True) -> None:
        self.log_dir = log_dir
        self._writer: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def histograms(self, model: nn.Module, step: int) -> None:
        """Weights and gradients of every trainable parameter."""
        if self._writer is None:
            return
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self._writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
            if param.grad is not None:
                self._writer.add_histogram(f"gradients/{name}", param.grad.detach().float().cpu(), step)

    def image_grid(
        self, tag: str, images: Tensor, mean: Sequence[float], std: Sequence[float], step: int
    ) -> None:
        """A grid of normalised images, shown as the model's input looked before normalising."""
        if self._writer is None:
            return
        from torchvision.utils import make_grid

        grid = make_grid(denormalize(images[:MAX_GRID_IMAGES], mean, std), nrow=8, padding=2)
        self._writer.add_image(tag, grid, step)

    def predictions(
        self,
        images: Tensor,
        predicted: Sequence[str],
        actual: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        step: int,
    ) -> None:
        """Images captioned `pred / true` on a green (right) or red (wrong) band; the caller picks them
        (tb_figures.choose_preview)."""
        if self._writer is None:
            return
        picture = draw_predictions(denormalize(images, mean, std), predicted, actual)
        self._writer.add_image("val/predictions", np.asarray(picture), step, dataformats="HWC")

    def graph(self, module: nn.Module, example: Tensor) -> None:
        """The module's graph, traced once on `example` (TensorBoard's Graphs tab)."""
        if self._writer is None:
            return
        try:
            with warnings.catch_warnings():  # torch.jit.trace's deprecation: add_graph has no other tracer
                warnings.simplefilter("ignore", FutureWarning)
                self._writer.add_graph(module, example, use_strict_trace=False)
        except Exception as exc:  # a graph is a nicety: a model that will not trace must still train
            log.warning("cannot trace %s for TensorBoard's graph: %s", type(module).__name__, exc)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure, rendered (Agg) to an image summary; the figure is closed."""
        if self._writer is not None:
            self._writer.add_figure(tag, figure, step, close=True)

    def pr_curve(self, tag: str, labels: Tensor, scores: Tensor, step: int) -> None:
        """A precision-recall curve of one label: 0/1 truths against the model's probabilities."""
        if self._writer is not None and len(labels):
            self._writer.add_pr_curve(tag, labels.long().cpu(), scores.float().cpu(), step)

    def embedding(
        self,
        features: Tensor,
        labels: Sequence[str],
        images: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        step: int,
    ) -> None:
        """Penultimate features in the projector, labelled, with thumbnails."""
        if self._writer is None or len(features) == 0:
            return
        thumbnails = nn.functional.interpolate(
            denormalize(images, mean, std), size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True
        ).clamp(0, 1)
        self._writer.add_embedding(
            features, metadata=list(labels), label_img=thumbnails, global_step=step, tag="val_features"
        )

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def hparams(self, hparams: Mapping[str, HParam], metrics: Mapping[str, float]) -> None:
        """The run's hyperparameters with its final metrics (a run in the `hparams` sub-folder)."""
        if self._writer is None:
            return
        values = {k: v if isinstance(v, bool | str | float | int) else str(v) for k, v in hparams.items()}
        self._writer.add_hparams(values, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo Normalize: back to [0, 1] pixel values."""
    images = images.detach().float().cpu()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)
