"""ADE20K and COCO-Stuff adapters on hand-made label PNGs: one row per class present, label_png mask references."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from manifests.class_names import ADE20K_CLASSES, COCO_STUFF_CLASSES
from manifests.registry import build_manifest
from shared.masks import rasterize

from fixtures_datasets import write_jpeg, write_label_png

H, W = 20, 30


def _ade_label() -> np.ndarray:
    label = np.zeros((H, W), np.uint8)  # 0 = other
    label[:, :10] = 1  # wall
    label[5:15, 12:20] = 13  # person
    return label


def test_ade20k_rows_masks_and_skips(tmp_path):
    root = tmp_path / "data"
    images, labels = root / "ade20k" / "images" / "training", root / "ade20k" / "annotations" / "training"
    write_jpeg(images / "ADE_train_00000001.jpg", H, W)
    write_label_png(labels / "ADE_train_00000001.png", _ade_label())
    write_jpeg(images / "ADE_train_00000002.jpg", H, W)
    write_label_png(labels / "ADE_train_00000002.png", np.zeros((H, W)))  # only "other"
    write_label_png(labels / "ADE_train_00000003.png", _ade_label())  # no image: 2 class samples lost
    write_jpeg(images / "ADE_train_00000004.jpg", H, W)  # no label
    write_jpeg(images / "ADE_train_00000005.jpg", H + 1, W)
    write_label_png(labels / "ADE_train_00000005.png", _ade_label())  # size differs: 2 samples
    write_jpeg(images / "ADE_train_00000006.jpg", H, W)
    odd = np.full((H, W), 3, np.uint8)
    odd[0, 0] = 200  # outside the 150 classes
    write_label_png(labels / "ADE_train_00000006.png", odd)
    (labels / "ADE_train_00000007.png").write_bytes(b"not a png")
    write_jpeg(images / "ADE_train_00000007.jpg", H, W)

    result = build_manifest("ade20k", root, "train", tmp_path / "ade20k-train.parquet")
    rows = pq.read_table(result.path).to_pylist()
    assert [(r["sample_id"], r["query"]) for r in rows] == [
        ("ade20k/train/ADE_train_00000001/1", "wall"),
        ("ade20k/train/ADE_train_00000001/13", "person"),
        ("ade20k/train/ADE_train_00000006/3", "sky"),
    ]
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and len(ADE20K_CLASSES) == 150
    wall, person, sky = rows
    assert (wall["image_path"], wall["image_id"], wall["height"], wall["width"]) == (
        "ade20k/images/training/ADE_train_00000001.jpg", "ADE_train_00000001", H, W,
    )  # fmt: skip
    assert all((r["family"], r["query_kind"], r["dataset"]) == ("semantic", "class", "ade20k") for r in rows)
    assert json.loads(person["mask"]) == {
        "type": "label_png",
        "path": "ade20k/annotations/training/ADE_train_00000001.png",
        "class_values": [13],
        "ignore_values": [0],
    }
    label = _ade_label()
    expected = np.where(label == 13, 1, np.where(label == 0, 255, 0)).astype(np.uint8)
    np.testing.assert_array_equal(rasterize(person["mask"], H, W, root), expected)
    wall_mask = rasterize(wall["mask"], H, W, root)
    assert int((wall_mask == 1).sum()) == H * 10 and int((wall_mask == 0).sum()) == 80
    assert json.loads(sky["mask"])["ignore_values"] == [0, 200]
    assert result.skipped == {
        "no labelled class": 1,
        "image missing": 2,
        "label missing": 1,
        "label size differs from image": 2,
        "unknown label value": 1,
        "label unreadable": 1,
    }


def test_ade20k_val_reads_validation_folder(tmp_path):
    root = tmp_path / "data"
    write_jpeg(root / "ade20k" / "images" / "validation" / "ADE_val_00000001.jpg", H, W)
    write_label_png(root / "ade20k" / "annotations" / "validation" / "ADE_val_00000001.png", np.full((H, W), 150))
    result = build_manifest("ade20k", root, "val", tmp_path / "ade20k-val.parquet")
    (row,) = pq.read_table(result.path).to_pylist()
    assert (row["sample_id"], row["query"], row["split"]) == ("ade20k/val/ADE_val_00000001/150", "flag", "val")


def test_cocostuff_rows_ignore_hyphen_classes_and_unlabeled(tmp_path):
    root = tmp_path / "data"
    label = np.full((H, W), 255, np.uint8)  # unlabeled
    label[:5] = 156  # sky
    label[5:10] = 172  # wall-other: ignored, never a query
    label[10:15, :8] = 0  # person
    write_label_png(root / "cocostuff" / "train2017" / "000000000009.png", label)
    write_jpeg(root / "coco" / "train2017" / "000000000009.jpg", H, W)
    write_label_png(root / "cocostuff" / "train2017" / "000000000010.png", np.full((H, W), 172))  # only ignored
    write_jpeg(root / "coco" / "train2017" / "000000000010.jpg", H, W)
    write_label_png(root / "cocostuff" / "train2017" / "000000000011.png", label)  # image missing: 2 samples

    assert (COCO_STUFF_CLASSES[0], COCO_STUFF_CLASSES[156], COCO_STUFF_CLASSES[172]) == ("person", "sky", "wall-other")
    result = build_manifest("cocostuff", root, "train", tmp_path / "cocostuff-train.parquet")
    rows = pq.read_table(result.path).to_pylist()
    assert [(r["sample_id"], r["query"]) for r in rows] == [
        ("cocostuff/train/000000000009/0", "person"),
        ("cocostuff/train/000000000009/156", "sky"),
    ]
    person, sky = rows
    assert person["image_path"] == "coco/train2017/000000000009.jpg"
    assert json.loads(sky["mask"]) == {
        "type": "label_png",
        "path": "cocostuff/train2017/000000000009.png",
        "class_values": [156],
        "ignore_values": [172, 255],
    }
    expected = np.where(label == 0, 1, np.where((label == 255) | (label == 172), 255, 0)).astype(np.uint8)
    np.testing.assert_array_equal(rasterize(person["mask"], H, W, root), expected)
    assert int((rasterize(sky["mask"], H, W, root) == 1).sum()) == 5 * W
    assert result.skipped == {"no labelled class": 1, "image missing": 2}
