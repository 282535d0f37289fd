"""Part-segmentation adapters: PACO-LVIS and PASCAL-Part (COCO-format JSON) -> one row per (image, category present).

PACO-LVIS: ``vlpart/paco/annotations/paco_lvis_v1_{train,val}.json``; images are COCO 2017 images under ``coco/`` by
their ``file_name`` (e.g. ``train2017/000000000139.jpg``).
PASCAL-Part: ``vlpart/pascal_part/{train,val}.json``; images under ``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/``.

Category names are ``"obj:part"`` or ``"obj"``; as in LISA each piece loses any ``_(...)`` suffix, and the query is
``"obj part"`` (underscores as spaces) or ``"obj"``. A sample's mask is the union of all of that category's
annotations on the image (``coco`` kind); ``query_index`` is the category id.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.console import progress as tqdm  # tqdm on a terminal, plain lines in a log

from manifests.coco_format import CocoIndex, checked_image_size, coco_mask_ref, is_record_id, load_coco_json
from manifests.common import ManifestBuilder, SkipSample, dataset_file

FAMILY = "semantic"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PartSpec:
    """Where one part dataset keeps its annotation files and images (relative to the data root)."""

    name: str
    annotation_template: str  # formatted with split=
    image_dir: str


PART_DATASETS: dict[str, PartSpec] = {
    "paco_lvis": PartSpec("paco_lvis", "vlpart/paco/annotations/paco_lvis_v1_{split}.json", "coco"),
    "pascal_part": PartSpec(
        "pascal_part", "vlpart/pascal_part/{split}.json", "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"
    ),
}


def part_query(category_name: str) -> str:
    """``"dog:leg"`` -> ``"dog leg"``, ``"bottle_(wine):cap"`` -> ``"bottle cap"``, ``"soda_can"`` -> ``"soda can"``.

    Raises:
        ValueError: more than one ':' or an empty piece.
    """
    pieces = category_name.strip().split(":")
    if len(pieces) > 2:
        raise ValueError(f"category name {category_name!r} has more than one ':'")
    cleaned = [piece.split("_(")[0].replace("_", " ").strip() for piece in pieces]
    if not all(cleaned):
        raise ValueError(f"category name {category_name!r} has an empty piece")
    return " ".join(cleaned)


def build_parts(dataset: str, data_root: Path, split: str) -> ManifestBuilder:
    """Read ``split`` of paco_lvis or pascal_part under ``data_root`` into a filled builder."""
    if dataset not in PART_DATASETS:
        raise ValueError(f"unknown part dataset {dataset!r}; valid: {', '.join(PART_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"{dataset} has no split {split!r}; valid: {', '.join(SPLITS)}")
    spec = PART_DATASETS[dataset]
    data_root = Path(data_root)
    coco = load_coco_json(dataset_file(data_root, spec.annotation_template.format(split=split)))  # inside the root
    builder = ManifestBuilder(dataset, split, data_root)

    queries: dict[Any, str] = {}
    bad_categories: dict[Any, str] = {}
    for category_id, category in coco.categories.items():
        try:
            queries[category_id] = part_query(str(category.get("name", "")))
        except ValueError as error:
            bad_categories[category_id] = str(error)

    annotations_by_image: dict[Any, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for annotation_id, annotation in coco.annotations.items():
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        if not is_record_id(image_id) or image_id not in coco.images:
            where = f"annotation {annotation_id!r}: image_id {image_id!r} not in {coco.path.name}"
            builder.skip("image record missing", where)
        elif not is_record_id(category_id):
            builder.skip("unknown category", f"annotation {annotation_id!r}: category_id {category_id!r}")
        elif category_id in bad_categories:
            builder.skip("bad category name", f"annotation {annotation_id!r}: {bad_categories[category_id]}")
        elif category_id not in queries:
            builder.skip("unknown category", f"annotation {annotation_id!r}: category_id {category_id!r}")
        else:
            annotations_by_image[image_id][category_id].append(annotation)

    for image_id in tqdm(sorted(annotations_by_image, key=_id_order), desc=f"{dataset}/{split}", unit="image"):
        _add_image(builder, spec, coco, image_id, annotations_by_image[image_id], queries)
    return builder


def _id_order(value: Any) -> tuple[int, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def _add_image(
    builder: ManifestBuilder,
    spec: PartSpec,
    coco: CocoIndex,
    image_id: Any,
    annotations_by_category: dict[Any, list[dict]],
    queries: dict[Any, str],
) -> None:
    image = coco.images[image_id]
    where = f"image_id {image_id!r}"
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        builder.skip("image record missing", f"{where}: no file_name", len(annotations_by_category))
        return
    image_path = f"{spec.image_dir}/{file_name}"
    try:
        height, width = checked_image_size(builder, image, image_path, where)
    except SkipSample as skip:
        builder.skip(skip.reason, skip.detail, len(annotations_by_category))
        return
    for category_id in sorted(annotations_by_category, key=_id_order):
        category_where = f"{where} category {category_id!r}"
        try:
            mask = coco_mask_ref(annotations_by_category[category_id], height, width, category_where)
        except SkipSample as skip:
            builder.skip(skip.reason, skip.detail, skip.count)
            continue
        builder.add_unless_duplicate(
            image_id=str(image_id),
            query_index=category_id,
            family=FAMILY,
            image_path=image_path,
            query=queries[category_id],
            query_kind="class",
            mask=mask,
            height=height,
            width=width,
            source=f"{coco.path.name} {category_where}",
        )
