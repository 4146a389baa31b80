"""What the TensorBoard images show: which validation images the prediction grid samples, the grid
itself (PIL), and the confusion-matrix figure (matplotlib, Agg backend).

Pure functions of tensors and labels; the writer lives in service.training.tb_logger.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

# TensorBoard shrinks an image to its card (about 240 px wide): few, large tiles and a large font keep
# the captions readable there without clicking "actual size".
TILE = 96  # px: each image is scaled to this, so a 28 px digit shows as well as a 224 px photo
GAP = 6  # px between tiles
BAND = 34  # px: the caption band under each image
HEADER = 36  # px: the legend above the grid
FONT_SIZE = 24
RIGHT, WRONG = (16, 112, 40), (190, 24, 24)  # band colours; white text on both is high contrast


def choose_preview(predictions: Tensor, targets: Tensor, n: int) -> list[int]:
    """Up to `n` indices into predictions/targets: the mistakes first, then correct ones, each phase
    taking one image per class in turn (class order, then index order), so the grid covers the classes
    instead of showing the first n images of the first class. Deterministic.

    Multiclass/binary: 1-D class indices. Multilabel: 0/1 rows, grouped by their first true label.
    """
    if predictions.dim() == 2:
        wrong = (predictions.long() != targets.long()).any(dim=1).tolist()
        groups = [int(row.argmax()) if row.any() else -1 for row in targets.long()]
    else:
        wrong = (predictions.long() != targets.long()).tolist()
        groups = [int(t) for t in targets]
    chosen: list[int] = []
    shown: set[int] = set()
    for mistakes in (True, False):
        by_group: dict[int, list[int]] = {}
        for index, (is_wrong, group) in enumerate(zip(wrong, groups, strict=True)):
            if is_wrong == mistakes:
                by_group.setdefault(group, []).append(index)
        # classes not yet in the grid go first, so the correct phase fills the gaps the mistakes left
        order = sorted(by_group, key=lambda g: (g in shown, g))
        queues = [by_group[g] for g in order]
        for turn in range(max((len(q) for q in queues), default=0)):
            for group, queue in zip(order, queues, strict=True):
                if len(chosen) == n:
                    return chosen
                if turn < len(queue):
                    chosen.append(queue[turn])
                    shown.add(group)
    return chosen


def draw_predictions(
    images: Tensor, predicted: Sequence[str], actual: Sequence[str], columns: int = 4
) -> Image.Image:
    """A grid of [0, 1] images, each above a band reading `pred / true`: green when right, red when
    wrong, in white text large enough to read at TensorBoard's default zoom."""
    n = len(images)
    rows = max(1, (n + columns - 1) // columns)
    width = columns * (TILE + GAP)
    canvas = Image.new("RGB", (width, HEADER + rows * (TILE + BAND + GAP)), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    font = _font(FONT_SIZE)
    legend = _fit(pen, "predicted / true", font, width - 8)
    pen.text((4, (HEADER - FONT_SIZE) // 2 - 2), legend, fill=(0, 0, 0), font=font)
    tiles = nn.functional.interpolate(images.float(), size=(TILE, TILE), mode="nearest")
    for i in range(n):
        x, y = tile_origin(i, columns)
        pixels = (tiles[i].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if pixels.shape[2] == 1:
            pixels = np.repeat(pixels, 3, axis=2)
        canvas.paste(Image.fromarray(pixels), (x, y))
        right = predicted[i] == actual[i]
        pen.rectangle((x, y + TILE, x + TILE - 1, y + TILE + BAND - 1), fill=RIGHT if right else WRONG)
        caption = _fit(pen, f"{predicted[i]} / {actual[i]}", font, TILE - 8)
        pen.text((x + 4, y + TILE + (BAND - FONT_SIZE) // 2 - 1), caption, fill=(255, 255, 255), font=font)
    return canvas


def tile_origin(i: int, columns: int = 4) -> tuple[int, int]:
    """Top-left pixel of the i-th image in the grid; its band starts TILE px lower."""
    return (i % columns) * (TILE + GAP), HEADER + (i // columns) * (TILE + BAND + GAP)


def _font(size: int) -> Any:
    # Pillow >= 10.1 ships a scalable default font; the bitmap fallback is tiny but never fails
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def _fit(pen: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if pen.textlength(text, font=font) <= width:
        return text
    while text and pen.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def confusion_figure(confusion: list[Any], class_names: Sequence[str], title: str) -> Any:
    """A matplotlib Figure of the confusion matrix: [true][predicted] counts (multiclass, binary), or
    one row of TN/FP/FN/TP per label (multilabel: `confusion` is one [[tn, fp], [fn, tp]] per label)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a worker or a container; must precede pyplot
    from matplotlib.figure import Figure

    multilabel = bool(confusion) and isinstance(confusion[0][0], list)
    if multilabel:
        matrix = np.array([[c[0][0], c[0][1], c[1][0], c[1][1]] for c in confusion])
        columns: Sequence[str] = ("TN", "FP", "FN", "TP")
        xlabel, ylabel = "outcome", "label"
    else:
        matrix, columns = np.array(confusion), class_names
        xlabel, ylabel = "predicted", "true"
    rows_n, cols_n = matrix.shape
    # small figures with large type: TensorBoard shows the figure about 240 px wide until clicked
    side = min(max(4.0, 0.4 * max(rows_n, cols_n) + 1.5), 20.0)
    figure = Figure(figsize=(side if not multilabel else 6.0, side), dpi=100)
    axes = figure.add_subplot()
    shown = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04)
    if max(rows_n, cols_n) <= 40:  # beyond that, tick labels and counts overlap into noise
        axes.set_xticks(range(cols_n), labels=list(columns), rotation=45, ha="right", fontsize=11)
        axes.set_yticks(range(rows_n), labels=list(class_names), fontsize=11)
        threshold = matrix.max() / 2 if matrix.size else 0
        for (r, c), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            axes.text(c, r, str(count), ha="center", va="center", color=colour, fontsize=11)
    axes.set_xlabel(xlabel, fontsize=12)
    axes.set_ylabel(ylabel, fontsize=12)
    axes.set_title(title, fontsize=13)
    figure.tight_layout()
    return figure
