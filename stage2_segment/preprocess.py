"""SAM input preprocessing, as in LISA and segment-anything.

Image: resize the longest side to the variant's image size S with segment-anything's ``ResizeLongestSide`` (PIL
bilinear), normalise with SAM's pixel mean/std, pad right/bottom with zeros to SxS -> 3xSxS float32, plus the resized
(h, w) that ``AdaptedSam.postprocess_masks`` needs to crop the padding away.
Mask: the same resize with nearest-neighbour sampling (labels 0, 1 and 255 = ignore stay labels), padded with the
ignore label so that padding never counts in the loss -> SxS uint8.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IGNORE_LABEL = 255


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side of an HxW image to ``image_size`` (segment-anything's rounding)."""
    return ResizeLongestSide.get_preprocess_shape(height, width, image_size)


def preprocess_image(image: np.ndarray | Image.Image, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 RGB (array or PIL image) -> (3xSxS float32 normalised and padded, resized (h, w))."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    resized = ResizeLongestSide(image_size).apply_image(image)
    height, width = resized.shape[:2]
    pixels = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    pixels = (pixels - mean) / std
    pixels = F.pad(pixels, (0, image_size - width, 0, image_size - height))
    return pixels, (height, width)


def preprocess_mask(mask: np.ndarray, image_size: int, pad_label: int = IGNORE_LABEL) -> torch.Tensor:
    """HxW uint8 labels (0 background, 1 target, 255 ignore) -> SxS uint8, nearest resize, padded with ``pad_label``."""
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {mask.shape}")
    height, width = resized_shape(mask.shape[0], mask.shape[1], image_size)
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST))
    padded = np.full((image_size, image_size), pad_label, dtype=np.uint8)
    padded[:height, :width] = resized
    return torch.from_numpy(padded)
