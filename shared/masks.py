"""Mask references -> HxW uint8 arrays (1 = target, 0 = background, 255 = ignore).

A manifest row stores its mask as a small JSON reference (``mask`` column) that ``rasterize`` turns into pixels at the
image's original size. The kinds, by key ``"type"``:

- ``{"type": "reasonseg", "shapes": [{"label": str, "points": [[x, y], ...]}, ...]}``: ReasonSeg/LabelMe polygons,
  rasterised exactly as LISA's ``get_mask_from_json`` does (``reasonseg_mask``).
- ``{"type": "coco", "segmentations": [...]}``: the union of COCO segmentations, polygons or RLE (``coco_mask``).
- ``{"type": "label_png", "path": str, "class_values": [int], "ignore_values": [int]}``: a single-channel label PNG
  (path relative to the data root) whose raw values select the target and the ignore region (``label_png_mask``).
- ``{"type": "none"}``: no ground truth (a manifest of the user's own images for inference, ``manifests.table``);
  ``rasterize`` refuses it with ``NoGroundTruthError``, so such a sample can be inferred but never scored.

Every malformed reference raises ``MaskError`` saying what is wrong and where (shape or segmentation index).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask_api

from shared.paths import PathEscapeError, resolve_inside

TARGET_VALUE = 1
IGNORE_VALUE = 255
MASK_KINDS = ("reasonseg", "coco", "label_png", "none")
NO_GROUND_TRUTH = '{"type":"none"}'  # the mask column of an inference manifest
LABEL_PNG_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")
INT32_LIMIT = 2**31 - 1
COCO_COORDINATE_LIMIT = 1e6  # pycocotools allocates per pixel of polygon perimeter: keep absurd coordinates out


class MaskError(ValueError):
    """A mask reference that cannot be rasterised: bad structure, unknown kind, or a file that does not fit."""


class NoGroundTruthError(MaskError):
    """The sample has no ground truth (``{"type": "none"}``): it comes from an inference manifest."""


def mask_ref_json(kind_dict: dict[str, Any]) -> str:
    """The compact JSON (sorted keys) that a manifest stores in its ``mask`` column.

    Raises:
        MaskError: if ``kind_dict`` is not a dict with a known ``"type"``.
    """
    if not isinstance(kind_dict, dict):
        raise MaskError(f"mask reference is {type(kind_dict).__name__}, expected a dict")
    if kind_dict.get("type") not in MASK_KINDS:
        raise MaskError(f"unknown mask reference type {kind_dict.get('type')!r}; expected one of {MASK_KINDS}")
    return json.dumps(kind_dict, separators=(",", ":"), sort_keys=True, default=_json_number)


def _json_number(value: Any) -> int | float:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _is_number(value: Any) -> bool:
    return isinstance(value, (Real, np.number)) and not isinstance(value, (bool, np.bool_))


def _is_whole(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and int(value) == value


def _polygon_points(points: Any, index: int) -> np.ndarray:
    """The ``points`` of one ReasonSeg shape as LISA builds them: ``np.array([points], dtype=np.int32)``, 1xNx2."""
    if not isinstance(points, list) or not points:
        raise MaskError(f"shape {index}: 'points' is missing or not a non-empty list of [x, y] pairs")
    for point_index, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 2 or not all(_is_number(c) for c in point):
            raise MaskError(f"shape {index}: point {point_index} is {point!r}, expected [x, y] numbers")
        if not all(math.isfinite(c) and abs(c) <= INT32_LIMIT for c in point):
            raise MaskError(f"shape {index}: point {point_index} is {point!r}, outside the int32 range or not finite")
    return np.array([points], dtype=np.int32)  # float coordinates truncate toward zero, as in LISA


def reasonseg_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """Rasterise ReasonSeg polygons like LISA's ``get_mask_from_json``; HxW uint8 with values {0, 1, 255}.

    Shapes labelled ``flag`` (any case) are skipped. The others are drawn largest filled area first, each as a 1-px
    closed outline then a fill, so smaller shapes overwrite larger ones; a label containing ``ignore`` draws 255, any
    other label 1. Points outside the image are clipped by OpenCV; one- and two-point shapes draw a dot or a line.

    Raises:
        MaskError: missing ``shapes``, or a shape without a string ``label`` or with malformed ``points``.
    """
    if not isinstance(annotation, dict) or not isinstance(annotation.get("shapes"), list):
        raise MaskError("reasonseg annotation has no 'shapes' list")
    area_list = []
    valid_polygons = []  # (label, 1xNx2 int32 points)
    for index, shape in enumerate(annotation["shapes"]):
        if not isinstance(shape, dict):
            raise MaskError(f"shape {index}: is {type(shape).__name__}, expected an object with 'label' and 'points'")
        label = shape.get("label")
        if not isinstance(label, str):
            raise MaskError(f"shape {index}: 'label' is {label!r}, expected a string")
        if "points" not in shape:
            raise MaskError(f"shape {index} ({label!r}): 'points' is missing")
        if label.lower() == "flag":
            continue
        points = _polygon_points(shape["points"], index)
        shape_mask = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(shape_mask, points, True, 1, 1)
        cv2.fillPoly(shape_mask, points, 1)
        area_list.append(shape_mask.sum())
        valid_polygons.append((label, points))
    sort_index = list(np.argsort(area_list)[::-1].astype(np.int32))  # LISA's exact order, ties included
    mask = np.zeros((height, width), dtype=np.uint8)
    for shape_index in sort_index:
        label, points = valid_polygons[shape_index]
        label_value = IGNORE_VALUE if "ignore" in label.lower() else TARGET_VALUE
        cv2.polylines(mask, points, True, label_value, 1)
        cv2.fillPoly(mask, points, label_value)
    return mask


def _compressed_rle_total(counts: bytes) -> int | None:
    """Sum of the run lengths in a COCO compressed RLE string (pycocotools' rleFrString), or None if malformed.

    pycocotools decodes a malformed string without complaint, so this is checked before handing it over.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None
            code = counts[position] - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return sum(runs)


def _segmentation_rles(segmentation: Any, index: int, height: int, width: int) -> list[dict]:
    """pycocotools RLEs for one COCO segmentation (polygon list or RLE dict); polygons with < 6 coordinates dropped."""
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
            raise MaskError(f"segmentation {index}: RLE size {size!r} differs from the image size [{height}, {width}]")
        if isinstance(counts, list):
            if not all(_is_whole(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                total = height * width
                raise MaskError(f"segmentation {index}: uncompressed RLE counts must be >= 0 and sum to {total}")
            uncompressed = {"size": [height, width], "counts": [int(c) for c in counts]}
            return [coco_mask_api.frPyObjects(uncompressed, height, width)]
        if isinstance(counts, str) and counts.isascii():
            counts = counts.encode("ascii")
        if not isinstance(counts, bytes) or _compressed_rle_total(counts) != height * width:
            raise MaskError(
                f"segmentation {index}: compressed RLE counts are malformed or do not cover {height}x{width}"
            )
        return [{"size": [height, width], "counts": counts}]
    if isinstance(segmentation, list):
        polygons = []
        for polygon_index, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_is_number(c) for c in polygon):
                raise MaskError(f"segmentation {index}: polygon {polygon_index} is not a list of numbers")
            if not all(math.isfinite(c) and abs(c) <= COCO_COORDINATE_LIMIT for c in polygon):
                raise MaskError(f"segmentation {index}: polygon {polygon_index} has a coordinate that is not finite "
                                f"or beyond +-{COCO_COORDINATE_LIMIT:g}")  # fmt: skip
            if len(polygon) >= 6:
                polygons.append([float(c) for c in polygon])
        return coco_mask_api.frPyObjects(polygons, height, width) if polygons else []
    raise MaskError(f"segmentation {index}: is {type(segmentation).__name__}, expected a polygon list or an RLE dict")


def coco_mask(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """Union of COCO segmentations (polygon lists ``[[x1, y1, x2, y2, ...], ...]`` or RLE dicts) as HxW uint8 {0, 1}.

    Polygons are converted with ``frPyObjects`` and merged, RLEs decoded, as refer.py's ``annToMask`` does. Polygons
    with fewer than 6 coordinates are skipped (pycocotools would misread or reject them).

    Raises:
        MaskError: a segmentation of the wrong structure, an RLE whose size or counts do not fit the image, or nothing
            valid left to draw.
    """
    if not isinstance(segmentations, (list, tuple)):
        raise MaskError(f"coco 'segmentations' is {type(segmentations).__name__}, expected a list")
    rles = []
    for index, segmentation in enumerate(segmentations):
        rles.extend(_segmentation_rles(segmentation, index, height, width))
    if not rles:
        raise MaskError(
            f"coco mask has no valid segmentation among {len(segmentations)} (polygons need >= 6 coordinates)"
        )
    merged = coco_mask_api.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
    with warnings.catch_warnings():  # pycocotools' Cython __array__ predates NumPy 2's copy keyword
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        decoded = coco_mask_api.decode(merged)
    return np.ascontiguousarray(decoded, dtype=np.uint8)


def label_png_mask(label: np.ndarray, class_values: Sequence[int], ignore_values: Sequence[int]) -> np.ndarray:
    """HxW raw label values -> HxW uint8: values in ``class_values`` -> 1, in ``ignore_values`` -> 255, others 0."""
    mask = np.zeros(label.shape, dtype=np.uint8)
    if len(ignore_values):
        mask[np.isin(label, np.asarray(ignore_values))] = IGNORE_VALUE
    if len(class_values):
        mask[np.isin(label, np.asarray(class_values))] = TARGET_VALUE
    return mask


def _int_list(reference: dict, key: str) -> list[int]:
    values = reference.get(key)
    if not isinstance(values, list) or not all(_is_whole(v) for v in values):
        raise MaskError(f"label_png reference: {key!r} is {values!r}, expected a list of integers")
    return [int(v) for v in values]


def _read_label_png(reference: dict, height: int, width: int, data_root: Path) -> np.ndarray:
    relative = reference.get("path")
    if not isinstance(relative, str):
        raise MaskError(f"label_png reference: 'path' is {relative!r}, expected a string relative to data_root")
    try:
        absolute = resolve_inside(Path(data_root), relative)
    except PathEscapeError as error:
        raise MaskError(f"label_png reference: {error}") from error
    if not absolute.is_file():
        raise MaskError(f"label_png reference: {relative} not found under {data_root}")
    try:
        with Image.open(absolute) as label_image:
            if label_image.size != (width, height):
                raise MaskError(f"label_png {relative}: size {label_image.height}x{label_image.width} (HxW) differs "
                                f"from the sample's {height}x{width}")  # fmt: skip
            if label_image.mode not in LABEL_PNG_MODES:
                raise MaskError(f"label_png {relative}: mode {label_image.mode}, expected a single-channel label map")
            label_image.load()
            return np.asarray(label_image)  # raw values: palette indices for mode P, uint16 for 16-bit
    except MaskError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise MaskError(f"label_png {relative}: unreadable: {error}") from error


def rasterize(mask_ref: str | dict, height: int, width: int, data_root: Path) -> np.ndarray:
    """Rasterise a manifest mask reference (JSON string or parsed dict) at ``height`` x ``width``; HxW uint8.

    Raises:
        MaskError: invalid JSON, an unknown ``type``, or any problem the kind's rasteriser reports.
    """
    if isinstance(mask_ref, str):
        try:
            reference = json.loads(mask_ref)
        except json.JSONDecodeError as error:
            raise MaskError(f"mask reference is not valid JSON: {error}") from error
    else:
        reference = mask_ref
    if not isinstance(reference, dict):
        raise MaskError(f"mask reference is {type(reference).__name__}, expected an object with a 'type'")
    if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (height, width)):
        raise MaskError(f"mask size {height!r}x{width!r} must be positive integers")
    height, width = int(height), int(width)
    kind = reference.get("type")
    if kind == "none":
        raise NoGroundTruthError(
            "no ground-truth mask (mask type 'none'): this sample comes from an inference manifest of unlabelled "
            "images; run `llavaseg infer --input` on it, it cannot be evaluated or trained on"
        )
    if kind == "reasonseg":
        mask = reasonseg_mask(reference, height, width)
    elif kind == "coco":
        mask = coco_mask(reference.get("segmentations"), height, width)
    elif kind == "label_png":
        class_values = _int_list(reference, "class_values")
        ignore_values = _int_list(reference, "ignore_values")
        mask = label_png_mask(_read_label_png(reference, height, width, data_root), class_values, ignore_values)
    else:
        raise MaskError(f"unknown mask reference type {kind!r}; expected one of {MASK_KINDS}")
    if mask.shape != (height, width) or mask.dtype != np.uint8:
        raise MaskError(f"{kind} mask came out {mask.shape} {mask.dtype}, expected ({height}, {width}) uint8")
    return mask
