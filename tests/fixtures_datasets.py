"""Tiny datasets written on the fly in their real on-disk formats (LISA's directory layout under a data root).

ReasonSeg JSON + JPEG, refCOCO-family ``refs(*).p`` pickles (protocol 2) + ``instances.json``, ADE20K / COCO-Stuff label
PNGs, PACO-LVIS / PASCAL-Part COCO JSON. Tests build expectations by hand next to these calls.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_jpeg(path: Path, height: int, width: int, colour: tuple[int, int, int] = (120, 140, 160)) -> Path:
    """A plain-colour RGB JPEG of ``height`` x ``width``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, format="JPEG", quality=90)
    return path


def write_label_png(path: Path, label: np.ndarray) -> Path:
    """A single-channel (mode L) label PNG with the raw values of ``label`` (HxW uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L").save(path, format="PNG")
    return path


def reasonseg_shape(label: str, points: list[list[float]]) -> dict:
    """One LabelMe-style shape as ReasonSeg stores it."""
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def write_reasonseg_item(
    data_root: Path,
    split: str,
    name: str,
    text: list[str],
    is_sentence: bool,
    shapes: list[dict],
    size: tuple[int, int] = (40, 60),
    encoding: str = "utf-8",
    with_image: bool = True,
) -> Path:
    """Write ``reason_seg/ReasonSeg/<split>/<name>.json`` (+ a ``.jpg`` of ``size`` = (height, width)).

    Returns the JSON path.
    """
    split_dir = data_root / "reason_seg" / "ReasonSeg" / split
    split_dir.mkdir(parents=True, exist_ok=True)
    annotation = {"text": text, "is_sentence": is_sentence, "shapes": shapes}
    json_path = split_dir / f"{name}.json"
    json_path.write_bytes(json.dumps(annotation, ensure_ascii=False).encode(encoding))
    if with_image:
        write_jpeg(split_dir / f"{name}.jpg", *size)
    return json_path


def write_reasonseg_explanatory(data_root: Path, split: str, items: list[dict]) -> Path:
    """``reason_seg/ReasonSeg/explanatory/<split>.json``: a list of {"image", "query", "outputs"}."""
    path = data_root / "reason_seg" / "ReasonSeg" / "explanatory" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))
    return path


def write_coco_json(
    path: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None
) -> Path:
    """A COCO-format JSON with ``images`` (id, file_name, height, width), ``annotations`` and ``categories``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories or []}))
    return path


def write_refer_dataset(
    data_root: Path,
    name: str,
    refs: list[dict],
    images: list[dict],
    annotations: list[dict],
    split_by: str = "unc",
    categories: list[dict] | None = None,
) -> Path:
    """``refer_seg/<name>/refs(<split_by>).p`` (pickle protocol 2, as the originals) + ``instances.json``."""
    dataset_dir = data_root / "refer_seg" / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with (dataset_dir / f"refs({split_by}).p").open("wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    write_coco_json(dataset_dir / "instances.json", images, annotations, categories or [{"id": 1, "name": "thing"}])
    return dataset_dir


def make_ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[str]) -> dict[str, Any]:
    """A ref record shaped like the originals (sentences with sent/raw/tokens/sent_id)."""
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [ref_id * 10 + i for i in range(len(sentences))],
        "sentences": [
            {"sent": text, "raw": text, "tokens": text.split(), "sent_id": ref_id * 10 + i}
            for i, text in enumerate(sentences)
        ],
    }


def rectangle_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A COCO polygon (flat x, y list) of the rectangle with corners (x0, y0) and (x1, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]
