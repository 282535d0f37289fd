"""Overlay pictures for people: the image, the ground truth and the prediction side by side, with the query, the MLLM's
target and attributes, and the IoU written underneath."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = (40, 200, 60)
PRED_COLOUR = (230, 40, 40)
IGNORE_COLOUR = (128, 128, 128)
ALPHA = 0.5
PANEL_HEIGHT = 256
LINE_HEIGHT = 14
WRAP = 110


def tint(image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], alpha: float = ALPHA) -> np.ndarray:
    """HxWx3 uint8 with ``region`` (HxW bool) blended towards ``colour``."""
    out = image.astype(np.float32)
    out[region] = (1 - alpha) * out[region] + alpha * np.asarray(colour, np.float32)
    return out.round().astype(np.uint8)


def render_overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, caption: Sequence[str]) -> Image.Image:
    """Three panels (image | ground truth in green, ignore in grey | prediction in red) scaled to a common height,
    with ``caption`` lines (wrapped) below.

    Args:
        image: HxWx3 uint8 RGB at the original size.
        gt: HxW uint8 labels (1 target, 0 background, 255 ignore).
        pred: HxW bool prediction at the original size.
    """
    truth = tint(tint(image, gt == 255, IGNORE_COLOUR), gt == 1, GT_COLOUR)
    predicted = tint(image, pred.astype(bool), PRED_COLOUR)
    height, width = image.shape[:2]
    scale = PANEL_HEIGHT / height
    size = (max(1, round(width * scale)), PANEL_HEIGHT)
    panels = [Image.fromarray(panel).resize(size, Image.Resampling.BILINEAR) for panel in (image, truth, predicted)]
    lines = [wrapped for line in caption for wrapped in (textwrap.wrap(line, WRAP) or [""])]
    canvas_width = max(3 * size[0] + 8, 7 * WRAP)
    canvas = Image.new("RGB", (canvas_width, PANEL_HEIGHT + 8 + LINE_HEIGHT * len(lines) + 4), (255, 255, 255))
    for k, panel in enumerate(panels):
        canvas.paste(panel, (k * (size[0] + 4), 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, line in enumerate(lines):
        draw.text((4, PANEL_HEIGHT + 6 + k * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return canvas
