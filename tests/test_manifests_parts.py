"""PACO-LVIS and PASCAL-Part adapters on hand-made COCO JSON: part queries, union masks, skipped records."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as coco_mask

from manifests.parts import part_query
from manifests.registry import build_manifest
from shared.masks import rasterize

from fixtures_datasets import rectangle_polygon, write_coco_json, write_jpeg

H, W = 30, 40


def test_part_query_names():
    assert part_query("dog:leg") == "dog leg"
    assert part_query("dog") == "dog"
    assert part_query("bottle_(wine):cap_(bottle)") == "bottle cap"
    assert part_query("soda_can:pull_tab") == "soda can pull tab"
    with pytest.raises(ValueError, match="more than one ':'"):
        part_query("a:b:c")


def _ann(ann_id, image_id, category_id, segmentation):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation}


def test_paco_lvis_union_masks_and_skips(tmp_path):
    root = tmp_path / "data"
    write_jpeg(root / "coco" / "train2017" / "000000000139.jpg", H, W)
    write_jpeg(tmp_path / "outside.jpg", H, W)
    images = [
        {"id": 139, "file_name": "train2017/000000000139.jpg", "height": H, "width": W},
        {"id": 140, "file_name": "../../outside.jpg", "height": H, "width": W},
        {"id": 141, "file_name": "train2017/000000000141.jpg", "height": H, "width": W},  # not on disk
    ]
    categories = [
        {"id": 1, "name": "dog"},
        {"id": 2, "name": "dog:leg"},
        {"id": 3, "name": "bottle_(wine):cap_(bottle)"},
        {"id": 4, "name": "a:b:c"},
    ]
    annotations = [
        _ann(1, 139, 2, [rectangle_polygon(0, 0, 5, 10), [3.0, 3.0, 4.0, 4.0]]),  # a 2-point part is dropped
        _ann(2, 139, 2, [rectangle_polygon(20, 20, 30, 30)]),  # second leg: same sample, union
        _ann(3, 139, 1, [rectangle_polygon(0, 0, 40, 30)]),
        _ann(4, 139, 3, [[1, 1, 2, 2, "x", 3]]),  # bad polygon: the bottle-cap sample is skipped
        _ann(5, 140, 1, [rectangle_polygon(0, 0, 4, 4)]),  # escapes the data root
        _ann(6, 141, 1, [rectangle_polygon(0, 0, 4, 4)]),
        _ann(7, 999, 1, [rectangle_polygon(0, 0, 4, 4)]),  # unknown image
        _ann(8, 139, 4, [rectangle_polygon(0, 0, 4, 4)]),  # unusable category name
        _ann(9, 139, 77, [rectangle_polygon(0, 0, 4, 4)]),  # unknown category
    ]
    annotation_file = root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json"
    write_coco_json(annotation_file, images, annotations, categories)

    result = build_manifest("paco_lvis", root, "train", tmp_path / "paco_lvis-train.parquet")
    rows = pq.read_table(result.path).to_pylist()
    assert [(r["sample_id"], r["query"]) for r in rows] == [
        ("paco_lvis/train/139/1", "dog"),
        ("paco_lvis/train/139/2", "dog leg"),
    ]
    dog, leg = rows
    assert (leg["image_path"], leg["image_id"]) == ("coco/train2017/000000000139.jpg", "139")
    assert (leg["height"], leg["width"]) == (H, W)
    assert all((r["family"], r["query_kind"], r["dataset"]) == ("semantic", "class", "paco_lvis") for r in rows)
    assert len(json.loads(leg["mask"])["segmentations"]) == 2
    expected = np.zeros((H, W), np.uint8)
    expected[0:10, 0:5] = 1
    expected[20:30, 20:30] = 1
    np.testing.assert_array_equal(rasterize(leg["mask"], H, W, root), expected)
    assert int(rasterize(dog["mask"], H, W, root).sum()) == H * W
    assert result.skipped == {
        "invalid segmentation": 1,
        "path escapes data_root": 1,
        "image missing": 1,
        "image record missing": 1,
        "bad category name": 1,
        "unknown category": 1,
    }


def test_pascal_part_rle_and_size_mismatch(tmp_path):
    root = tmp_path / "data"
    jpeg_dir = root / "vlpart" / "pascal_part" / "VOCdevkit" / "VOC2010" / "JPEGImages"
    write_jpeg(jpeg_dir / "2008_000002.jpg", H, W)
    write_jpeg(jpeg_dir / "2008_000003.jpg", H, W)
    body = np.zeros((H, W), np.uint8)
    body[10:20, 5:35] = 1
    encoded = coco_mask.encode(np.asfortranarray(body))
    rle = {"size": [H, W], "counts": encoded["counts"].decode("ascii")}
    images = [
        {"id": 2, "file_name": "2008_000002.jpg", "height": H, "width": W},
        {"id": 3, "file_name": "2008_000003.jpg", "height": H, "width": W + 5},  # declared size is wrong
    ]
    categories = [
        {"id": 10, "name": "aeroplane:body"},
        {"id": 11, "name": "aeroplane:left_wing"},
        {"id": 12, "name": "aeroplane:tail"},
    ]
    annotations = [
        _ann(1, 2, 10, rle),
        _ann(2, 2, 11, {"size": [H + 1, W], "counts": rle["counts"]}),  # RLE of another size
        _ann(5, 2, 12, {"size": [H, W], "counts": "0a~"}),  # compressed counts that do not decode to H x W
        _ann(3, 3, 10, [rectangle_polygon(0, 0, 4, 4)]),
        _ann(4, 3, 11, [rectangle_polygon(0, 0, 4, 4)]),
    ]
    write_coco_json(root / "vlpart" / "pascal_part" / "val.json", images, annotations, categories)

    result = build_manifest("pascal_part", root, "val", tmp_path / "pascal_part-val.parquet")
    (row,) = pq.read_table(result.path).to_pylist()
    assert (row["sample_id"], row["query"]) == ("pascal_part/val/2/10", "aeroplane body")
    assert row["image_path"] == "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg"
    np.testing.assert_array_equal(rasterize(row["mask"], H, W, root), body)
    assert result.skipped == {"invalid segmentation": 2, "image size differs from annotation": 2}
    assert "RLE size" in result.examples["invalid segmentation"][0]
    assert "category 12" in result.examples["invalid segmentation"][1]


def test_unreadable_annotation_file_is_a_clear_error(tmp_path):
    path = tmp_path / "vlpart" / "pascal_part" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"train\.json: not valid JSON"):
        build_manifest("pascal_part", tmp_path, "train", tmp_path / "m.parquet")
