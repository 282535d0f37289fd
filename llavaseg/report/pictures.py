"""The report's pictures: mask outlines drawn over an image, gallery thumbnails, the loss curve and the IoU histogram.

Outlines are double strokes, readable on any target colour: a near-black band with a light core line, so one of the
two always contrasts with what lies under it (a green target under a green tint, as this report once drew its ground
truth, was invisible). Ground truth has a white core, prediction a magenta core; pixels the metric ignores (label
255) are tinted grey.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 512
OUTLINE_DARK = (10, 10, 10)
GT_OUTLINE = (255, 255, 255)  # the light core of the ground-truth outline
PRED_OUTLINE = (255, 40, 220)  # the light core of the prediction outline
IGNORE_COLOUR = (150, 150, 150)
OUTLINE_STYLES = {"gt": GT_OUTLINE, "pred": PRED_OUTLINE}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def outline_bands(mask: np.ndarray, core: int = 1, border: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(dark, light) HxW bool bands of a mask's outline: the light core is ``2*core+1`` pixels wide, centred on the
    mask's edge (its pixels with a background 4-neighbour; the image frame is no edge), the dark band ``border`` pixels
    on each side of it."""
    import cv2

    mask = np.asarray(mask, bool)
    if not mask.any():
        empty = np.zeros(mask.shape, bool)
        return empty, empty
    labels = mask.astype(np.uint8)
    edge = labels & ~cv2.erode(labels, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))).astype(bool)
    edge = edge.astype(np.uint8)
    light = cv2.dilate(edge, np.ones((2 * core + 1, 2 * core + 1), np.uint8)).astype(bool)
    wide = 2 * (core + border) + 1
    dark = cv2.dilate(edge, np.ones((wide, wide), np.uint8)).astype(bool) & ~light
    return dark, light


def draw_outlines(base: Image.Image, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]]) -> Image.Image:
    """``base`` (RGB) with each HxW label mask (1 target, 255 ignore; resized to ``base`` by nearest neighbour)
    outlined in a dark band around a light core of the given colour; ignored pixels tinted grey. Later masks are
    drawn over earlier ones."""
    pixels = np.asarray(base.convert("RGB"), dtype=np.float32).copy()
    outlines = []
    for mask, colour in masks:
        labels = np.asarray(Image.fromarray(np.asarray(mask, np.uint8)).resize(base.size, Image.NEAREST))
        ignored = labels == 255
        pixels[ignored] = 0.5 * pixels[ignored] + 0.5 * np.asarray(IGNORE_COLOUR, np.float32)
        outlines.append((outline_bands(labels == 1), colour))
    for (dark, light), colour in outlines:
        pixels[dark] = OUTLINE_DARK
        pixels[light] = colour
    return Image.fromarray(pixels.round().astype(np.uint8))


def label_mask_values(picture: Image.Image) -> np.ndarray | None:
    """The HxW array of a one-channel picture whose values are all in {0, 1, 255}, else None (an overlay or photo)."""
    if picture.mode not in ("1", "L", "P", "I", "I;16"):
        return None
    values = np.asarray(picture.convert("L") if picture.mode == "1" else picture)
    if picture.mode == "1":
        values = (values > 0).astype(np.uint8)
    return values if np.isin(np.unique(values), (0, 1, 255)).all() else None


def read_label_mask(path: Path) -> np.ndarray | None:
    """A label-mask PNG's HxW values, or None when the file is a picture (an overlay); OSError when unreadable."""
    with Image.open(path) as picture:
        picture.load()
        return label_mask_values(picture)


def open_rgb(path: Path, size: int) -> Image.Image:
    """An image file as RGB, scaled down to fit ``size`` x ``size``."""
    with Image.open(path) as picture:
        picture.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
        rgb = picture.convert("RGB")
    rgb.thumbnail((size, size), Image.LANCZOS)
    return rgb


def thumbnail(source: Path, target: Path, background: Path | None, role: str | None) -> None:
    """Copy ``source`` to ``target`` as a thumbnail. With a ``role`` (gt or pred), a label mask is outlined in that
    role's style over ``background`` (or black); a picture that is no label mask, or the image itself, is copied as
    it is."""
    with Image.open(source) as picture:
        picture.load()
    mask = label_mask_values(picture) if role is not None else None
    if mask is not None:
        base = Image.new("RGB", picture.size)
        if background is not None:
            try:
                base = open_rgb(background, THUMBNAIL_SIZE)
            except OSError:  # reported with the image itself; draw the mask on black
                pass
        base.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
        picture = draw_outlines(base, [(mask, OUTLINE_STYLES[role])])
    else:
        picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".jpg":
        picture.convert("RGB").save(target, quality=88)
    else:
        picture.save(target)


def plot_loss_curve(loss_curve: Sequence[Mapping[str, Any]], path: Path) -> int:
    """Loss against step (learning rate on a twin axis) as a PNG; returns the number of points drawn (0: no file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = sorted(
        (float(r["step"]), float(r["loss"]), r.get("lr"))
        for r in loss_curve
        if is_number(r.get("step")) and is_number(r.get("loss")) and math.isfinite(r["loss"])
    )
    if not points:
        return 0
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    figure = Figure(figsize=(8, 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.plot(steps, losses, color="#1f5fbf", linewidth=1.6, marker="o" if len(points) < 40 else None, markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss", color="#1f5fbf")
    axis.grid(alpha=0.3)
    if min(losses) > 0 and max(losses) / min(losses) > 30:
        axis.set_yscale("log")
    lr_points = [(s, float(lr)) for s, _, lr in points if is_number(lr)]
    if lr_points:
        lr_axis = axis.twinx()
        lr_axis.plot(*zip(*lr_points), color="#d9822b", linewidth=1.2, linestyle="--")
        lr_axis.set_ylabel("learning rate", color="#d9822b")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return len(points)


HISTOGRAM_BINS = 20


def iou_histogram_counts(ious: Sequence[float], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Samples per IoU bin of width 1/bins over [0, 1]; IoU 1.0 falls in the last bin."""
    counts = [0] * bins
    for iou in ious:
        counts[min(bins - 1, max(0, int(float(iou) * bins)))] += 1
    return counts


def plot_iou_histogram(ious_by_split: Mapping[str, Sequence[float]], path: Path) -> int:
    """Per-sample IoU histogram (one stacked colour per split) as a PNG; returns the samples drawn (0: no file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {split: [float(v) for v in values if is_number(v) and math.isfinite(v)]
              for split, values in ious_by_split.items()}  # fmt: skip
    series = {split: values for split, values in series.items() if values}
    if not series:
        return 0
    figure = Figure(figsize=(8, 3.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    bottom = np.zeros(HISTOGRAM_BINS)
    for split, values in series.items():
        counts = np.asarray(iou_histogram_counts(values), float)
        axis.bar(edges[:-1], counts, width=1.0 / HISTOGRAM_BINS, bottom=bottom, align="edge", label=split,
                 edgecolor="white", linewidth=0.6)  # fmt: skip
        bottom += counts
    axis.set_xlim(0, 1)
    axis.set_xlabel("per-sample IoU")
    axis.set_ylabel("samples")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return sum(len(v) for v in series.values())
