"""COCO run-length encoding of predicted masks (pycocotools), as JSON strings ``{"size": [H, W], "counts": "..."}``."""

from __future__ import annotations

import json
import warnings

import numpy as np
from pycocotools import mask as coco_mask_api


def encode_mask(mask: np.ndarray) -> dict:
    """HxW bool/0-1 mask -> COCO RLE ``{"size": [H, W], "counts": str}`` (compressed counts, ASCII)."""
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {mask.shape}")
    rle = coco_mask_api.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_mask_json(mask: np.ndarray) -> str:
    return json.dumps(encode_mask(mask), separators=(",", ":"))


def decode_mask(rle: dict | str) -> np.ndarray:
    """COCO RLE (dict or its JSON string) -> HxW uint8 {0, 1}."""
    if isinstance(rle, str):
        rle = json.loads(rle)
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    with warnings.catch_warnings():  # pycocotools' Cython __array__ predates NumPy 2's copy keyword
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return np.ascontiguousarray(coco_mask_api.decode({"size": list(rle["size"]), "counts": counts}), np.uint8)
