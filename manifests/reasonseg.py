"""ReasonSeg adapter: ``<data_root>/reason_seg/ReasonSeg/{train,val,test}/<name>.jpg + <name>.json`` -> manifest rows.

Each JSON holds ``text`` (a list of queries), ``is_sentence`` (one bool for all of them) and ``shapes`` (LabelMe-style
``label`` + polygon ``points``). As in LISA, train uses every query of an image and val/test only the first one
(LISA's ValDataset). The mask reference keeps the non-``flag`` shapes; ``shared.masks`` rasterises them with LISA's
rules (largest polygon first, ``ignore`` labels -> 255). Explanations from ``explanatory/<split>.json``, when that file
exists, become ``reference_answer`` (matched by image and query, else by image).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.common import ManifestBuilder, SkipSample, dataset_file, image_files_by_stem
from shared.masks import mask_ref_json
from shared.paths import PathEscapeError

logger = logging.getLogger(__name__)

DATASET = "reasonseg"
FAMILY = "reasoning"
SPLITS = ("train", "val", "test")
REASONSEG_DIR = "reason_seg/ReasonSeg"


def read_json_lenient(path: Path) -> Any:
    """Parse a JSON file written as UTF-8 (with or without BOM) or, failing that, cp1252 (as LISA does).

    Raises:
        ValueError: the bytes decode in neither encoding or are not valid JSON (message names the file).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: neither UTF-8 nor cp1252 ({error})") from error
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # bad JSON, an absurd integer, absurd nesting
        raise ValueError(f"{path}: invalid JSON ({error})") from error


def _is_coordinate(value: Any) -> bool:
    """A finite number inside int32 (LISA casts points to int32)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and abs(value) < 2**31


def mask_shapes(shapes: Any, where: str) -> list[dict]:
    """The shapes that make the mask: non-``flag`` shapes reduced to ``label`` + ``points``.

    Raises:
        SkipSample: "invalid polygon" for a malformed non-flag shape, "no polygon" when none is left.
    """
    if not isinstance(shapes, list):
        raise SkipSample("malformed annotation", f"{where}: 'shapes' is {type(shapes).__name__}, expected a list")
    kept = []
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise SkipSample("invalid polygon", f"{where}: shapes[{index}] has no string 'label'")
        if shape["label"].lower() == "flag":  # LISA: meaningless deprecated annotations
            continue
        points = shape.get("points")
        if not isinstance(points, list) or not points:
            raise SkipSample("invalid polygon", f"{where}: shapes[{index}] ({shape['label']!r}) has no points")
        for point in points:
            if not isinstance(point, (list, tuple)) or len(point) != 2 or not all(_is_coordinate(c) for c in point):
                raise SkipSample(
                    "invalid polygon", f"{where}: shapes[{index}] ({shape['label']!r}) has a bad point {point!r}"
                )
        kept.append({"label": shape["label"], "points": [[point[0], point[1]] for point in points]})
    if not kept:
        raise SkipSample("no polygon", f"{where}: no shape other than 'flag'")
    return kept


def check_shapes_inside(shapes: list[dict], height: int, width: int, where: str) -> None:
    """Every shape must reach into the ``height`` x ``width`` image; one that lies entirely outside it (points as LISA
    casts them, truncated to int32) draws nothing and means the annotation does not belong to this image.

    Raises:
        SkipSample: "polygon outside image", naming the shape's label and extent.
    """
    for shape in shapes:
        xs = [int(x) for x, _ in shape["points"]]
        ys = [int(y) for _, y in shape["points"]]
        if max(xs) < 0 or min(xs) >= width or max(ys) < 0 or min(ys) >= height:
            raise SkipSample(
                "polygon outside image",
                f"{where}: shape {shape['label']!r} spanning x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)} lies "
                f"entirely outside the {height}x{width} image",
            )


def load_explanations(path: Path) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """``explanatory/<split>.json`` -> ({(image, query): outputs}, {image: first outputs}).

    Both are empty when the file is absent; an unusable file or item is logged and left out. ``path`` is checked by
    the caller (``dataset_file``).
    """
    by_query: dict[tuple[str, str], str] = {}
    by_image: dict[str, str] = {}
    if not path.is_file():
        return by_query, by_image
    try:
        items = read_json_lenient(path)
    except (OSError, ValueError) as error:
        logger.warning("reference answers not loaded: %s", error)
        return by_query, by_image
    if not isinstance(items, list):
        logger.warning("reference answers not loaded: %s holds %s, expected a list", path, type(items).__name__)
        return by_query, by_image
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            logger.warning("%s item %d: no 'image' string, ignored", path, index)
            continue
        outputs = item.get("outputs")
        if not isinstance(outputs, str) or not outputs.strip():
            logger.warning("%s item %d (%s): no 'outputs' string, ignored", path, index, item["image"])
            continue
        query = item.get("query")
        if isinstance(query, str):
            by_query.setdefault((item["image"], query.strip()), outputs)
        by_image.setdefault(item["image"], outputs)
    return by_query, by_image


def build_reasonseg(data_root: Path, split: str) -> ManifestBuilder:
    """Read ReasonSeg ``split`` under ``data_root`` into a filled builder (not yet written)."""
    if split not in SPLITS:
        raise ValueError(f"reasonseg has no split {split!r}; valid: {', '.join(SPLITS)}")
    data_root = Path(data_root)
    split_dir = data_root / REASONSEG_DIR / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ReasonSeg split folder not found: {split_dir}")
    builder = ManifestBuilder(DATASET, split, data_root)
    explanations = f"{REASONSEG_DIR}/explanatory/{split}.json"
    try:
        by_query, by_image = load_explanations(dataset_file(data_root, explanations))
    except PathEscapeError as error:
        logger.warning("reference answers not loaded: %s", error)
        by_query, by_image = {}, {}
    images = image_files_by_stem(split_dir)  # a.jpg, a.JPG, a.png ...: the bytes decide later if it is one we read
    annotations = {p.stem: p.name for p in split_dir.iterdir() if p.suffix.lower() == ".json"}
    stems = sorted(set(images) | set(annotations))
    for name in tqdm(stems, desc=f"{DATASET}/{split}", unit="image"):
        image_rel = f"{REASONSEG_DIR}/{split}/{images.get(name, name + '.jpg')}"
        json_rel = f"{REASONSEG_DIR}/{split}/{annotations.get(name, name + '.json')}"
        try:
            _add_image(builder, split, name, image_rel, json_rel, by_query, by_image)
        except SkipSample as skip:
            builder.skip(skip.reason, skip.detail or image_rel, skip.count)
    return builder


def _add_image(
    builder: ManifestBuilder,
    split: str,
    name: str,
    image_rel: str,
    json_rel: str,
    by_query: dict[tuple[str, str], str],
    by_image: dict[str, str],
) -> None:
    where = json_rel
    try:
        json_path = dataset_file(builder.data_root, json_rel)
    except PathEscapeError as error:
        raise SkipSample("path escapes data_root", f"{where}: {error}") from error
    if not json_path.is_file():
        raise SkipSample("annotation missing", f"{image_rel}: no {name}.json beside it")
    try:
        annotation = read_json_lenient(json_path)
    except (OSError, ValueError) as error:
        raise SkipSample("unreadable json", str(error)) from error
    if not isinstance(annotation, dict):
        raise SkipSample("malformed annotation", f"{where}: top level is {type(annotation).__name__}, expected object")
    for key in ("text", "is_sentence", "shapes"):
        if key not in annotation:
            raise SkipSample("malformed annotation", f"{where}: missing key {key!r}")
    if annotation["is_sentence"] not in (True, False):  # also admits 0 / 1
        raise SkipSample("malformed annotation", f"{where}: 'is_sentence' is {annotation['is_sentence']!r}, not a bool")
    queries = annotation["text"]
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries:
        raise SkipSample("no query", f"{where}: 'text' holds no query")
    if split != "train":
        queries = queries[:1]
    try:
        shapes = mask_shapes(annotation["shapes"], where)
        height, width = builder.image_size(image_rel, where)
        check_shapes_inside(shapes, height, width, where)
    except SkipSample as skip:
        raise skip.times(len(queries)) from None
    mask = mask_ref_json({"type": "reasonseg", "shapes": shapes})
    query_kind = "sentence" if bool(annotation["is_sentence"]) else "phrase"
    image_name = Path(image_rel).name
    for query_index, query in enumerate(queries):
        if not isinstance(query, str) or not query.strip():
            builder.skip("empty query", f"{where}: text[{query_index}] = {query!r}")
            continue
        query = query.strip()
        builder.add_unless_duplicate(
            image_id=name,
            query_index=query_index,
            family=FAMILY,
            image_path=image_rel,
            query=query,
            query_kind=query_kind,
            mask=mask,
            height=height,
            width=width,
            source=f"{where} text[{query_index}]",
            reference_answer=_reference(by_query, by_image, [image_name, f"{name}.jpg"], query),
        )


def _reference(
    by_query: dict[tuple[str, str], str], by_image: dict[str, str], image_names: list[str], query: str
) -> str | None:
    """The explanation of (image, query), else of the image; the image by its file name or as ``<name>.jpg``."""
    for image in image_names:
        if (image, query) in by_query:
            return by_query[(image, query)]
    return next((by_image[image] for image in image_names if image in by_image), None)
