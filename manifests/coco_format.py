"""COCO-format JSON shared by the refCOCO family, PACO-LVIS and PASCAL-Part: loading, indexing, segmentation checks.

A COCO segmentation is either a polygon list ``[[x0, y0, x1, y1, ...], ...]`` (one list per part; parts of fewer than
three points are dropped when rasterised, as pycocotools cannot draw them) or an RLE dict
``{"size": [h, w], "counts": str | list[int]}``. ``segmentation_problem`` screens one, ``coco_mask_ref`` a sample's
union, so that every mask reference a manifest stores can be rasterised by ``shared.masks``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.common import ManifestBuilder, SkipSample
from shared.masks import COCO_COORDINATE_LIMIT, MaskError, coco_mask, mask_ref_json

MAX_ID_LENGTH = 256


@dataclass(frozen=True)
class CocoIndex:
    """Images, annotations and categories of one COCO JSON, indexed by id."""

    path: Path
    images: dict[Any, dict]
    annotations: dict[Any, dict]
    categories: dict[Any, dict]


def load_coco_json(path: Path) -> CocoIndex:
    """Load and index a COCO-format JSON file.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not JSON, or lacks the ``images``/``annotations`` lists (message names the file and key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except (ValueError, RecursionError) as error:  # bad JSON or encoding, an absurd integer, absurd nesting
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is {type(data).__name__}, expected an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: key {key!r} missing or not a list")
    categories = data.get("categories", [])
    if not isinstance(categories, list):
        raise ValueError(f"{path}: key 'categories' is not a list")
    return CocoIndex(
        path=path,
        images=_by_id(data["images"], path, "images"),
        annotations=_by_id(data["annotations"], path, "annotations"),
        categories=_by_id(categories, path, "categories"),
    )


def _by_id(records: list, path: Path, key: str) -> dict[Any, dict]:
    indexed: dict[Any, dict] = {}
    for position, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}: {key}[{position}] has no 'id'")
        if not is_record_id(record["id"]):
            raise ValueError(f"{path}: {key}[{position}] has an 'id' of type {type(record['id']).__name__}")
        indexed[record["id"]] = record
    return indexed


def is_record_id(value: Any) -> bool:
    """An id a dataset may use for images, annotations, categories and refs: an int64 or a short string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Why ``segmentation`` cannot be rasterised at ``height`` x ``width``, or None when it can."""
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not isinstance(size, list) or size != [height, width]:
            return f"RLE size {size!r} differs from the image size [{height}, {width}]"
        if isinstance(counts, str):
            try:  # compressed counts can only be checked by decoding them
                coco_mask([segmentation], height, width)
            except MaskError as error:
                return str(error)
            return None
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return "RLE counts are not non-negative integers"
            if sum(counts) != height * width:
                return f"RLE counts sum to {sum(counts)}, expected {height * width}"
            return None
        return f"RLE counts is {type(counts).__name__}, expected str or list"
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty polygon list"
        for index, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_is_number(c) for c in polygon):
                return f"polygon {index} is not a list of numbers"
            if not all(abs(c) <= COCO_COORDINATE_LIMIT for c in polygon):
                return f"polygon {index} has a coordinate beyond +-{COCO_COORDINATE_LIMIT:g}"
            if len(polygon) % 2:
                return f"polygon {index} has an odd number of coordinates ({len(polygon)})"
            if len(polygon) >= 6 and (_outside(polygon[0::2], width) or _outside(polygon[1::2], height)):
                return f"polygon {index} lies entirely outside the {height}x{width} image"
        return None
    return f"segmentation is {type(segmentation).__name__}, expected a polygon list or an RLE dict"


def _outside(coordinates: list, size: int) -> bool:
    """Every x (or every y) left of (above) the image or at/after its far edge: the polygon draws no pixel."""
    return max(coordinates) < 0 or min(coordinates) >= size


def coco_mask_ref(annotations: list[dict], height: int, width: int, where: str) -> str:
    """The ``coco`` mask reference for the union of ``annotations``' segmentations.

    Raises:
        SkipSample: "invalid segmentation" naming the annotation id and the problem.
    """
    segmentations = []
    for annotation in annotations:
        segmentation = annotation.get("segmentation")
        problem = segmentation_problem(segmentation, height, width)
        if problem:
            raise SkipSample("invalid segmentation", f"{where}: annotation {annotation.get('id')!r}: {problem}")
        segmentations.append(segmentation)
    if not any(_drawable(segmentation) for segmentation in segmentations):
        ids = [annotation.get("id") for annotation in annotations]
        raise SkipSample("invalid segmentation", f"{where}: annotations {ids}: no polygon with 3 or more points")
    return mask_ref_json({"type": "coco", "segmentations": segmentations})


def _drawable(segmentation: dict | list) -> bool:
    """An RLE, or a polygon list with at least one polygon of 3+ points (``shared.masks`` drops smaller ones)."""
    return isinstance(segmentation, dict) or any(len(polygon) >= 6 for polygon in segmentation)


def checked_image_size(builder: ManifestBuilder, image: dict, image_path: str, where: str) -> tuple[int, int]:
    """Size of the image on disk, which must match the ``height``/``width`` its COCO record declares.

    Raises:
        SkipSample: from ``ManifestBuilder.image_size``, or "image size differs from annotation".
    """
    height, width = builder.image_size(image_path, where)
    declared = (image.get("height"), image.get("width"))
    if declared != (height, width):
        raise SkipSample(
            "image size differs from annotation",
            f"{where}: {image_path} is {height}x{width}, the annotation says {declared[0]}x{declared[1]}",
        )
    return height, width
