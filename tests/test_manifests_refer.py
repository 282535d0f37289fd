"""refCOCO-family adapter on hand-made refs pickles + instances.json; the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as coco_mask

from manifests.refer import load_refs, restricted_loads, split_matches
from manifests.registry import build_manifest
from shared.masks import rasterize

from fixtures_datasets import make_ref, rectangle_polygon, write_jpeg, write_refer_dataset

COCO_DIR = "refer_seg/images/mscoco/images/train2014"
H, W = 30, 40


def _rle_mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[2:6, 3:9] = 1
    mask[20:25, 30:33] = 1
    return mask


def _rle(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def _image(image_id: int, file_name: str) -> dict:
    return {"id": image_id, "file_name": file_name, "height": H, "width": W}


@pytest.fixture
def refcoco_root(tmp_path):
    root = tmp_path / "data"
    images = [
        _image(1, "COCO_train2014_000000000001.jpg"),
        _image(2, "COCO_train2014_000000000002.jpg"),
        _image(3, "../../../../../../outside.jpg"),  # escapes the data root (and exists there)
        _image(4, "COCO_train2014_000000000004.jpg"),  # file never written
        {"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 99, "width": W},  # size lies
    ]
    for image_id in (1, 2, 5):
        write_jpeg(root / COCO_DIR / f"COCO_train2014_{image_id:012d}.jpg", H, W)
    write_jpeg(tmp_path / "outside.jpg", H, W)
    annotations = [
        {"id": 101, "image_id": 1, "category_id": 1, "segmentation": [rectangle_polygon(10, 5, 30, 20)]},
        {"id": 102, "image_id": 1, "category_id": 1, "segmentation": _rle(_rle_mask()), "iscrowd": 1},
        {"id": 103, "image_id": 2, "category_id": 1, "segmentation": [rectangle_polygon(0, 0, 4, 4)]},
        {"id": 104, "image_id": 2, "category_id": 1, "segmentation": [[1.0, 2.0, 3.0, 4.0]]},  # 2 points
        {"id": 105, "image_id": 3, "category_id": 1, "segmentation": [rectangle_polygon(0, 0, 4, 4)]},
        {"id": 106, "image_id": 4, "category_id": 1, "segmentation": [rectangle_polygon(0, 0, 4, 4)]},
        {"id": 107, "image_id": 5, "category_id": 1, "segmentation": [rectangle_polygon(0, 0, 4, 4)]},
    ]
    refs = [
        make_ref(7, 102, 1, "train", ["the dog"]),
        make_ref(3, 101, 1, "train", ["man on the left", "  left guy "]),
        make_ref(4, 103, 2, "val", ["blue car"]),
        make_ref(5, 104, 2, "train", ["broken polygon"]),
        make_ref(6, 105, 3, "train", ["escaping"]),
        make_ref(8, 106, 4, "train", ["gone", "also gone"]),
        make_ref(9, 999, 2, "train", ["no annotation"]),
        make_ref(10, 107, 5, "train", ["wrong size"]),
        make_ref(11, 103, 2, "testB", ["car again"]),
        make_ref(12, 101, 1, "testAB", ["shared test"]),
    ]
    write_refer_dataset(root, "refcoco", refs, images, annotations)
    return root


def test_refcoco_train_rows_and_skips(refcoco_root, tmp_path):
    result = build_manifest("refcoco", refcoco_root, "train", tmp_path / "refcoco-train.parquet")
    rows = pq.read_table(result.path).to_pylist()
    # ref 3 sorts before ref 7 on image 1: its two sentences take query indices 0 and 1.
    assert [(r["sample_id"], r["query"]) for r in rows] == [
        ("refcoco/train/1/0", "man on the left"),
        ("refcoco/train/1/1", "left guy"),
        ("refcoco/train/1/2", "the dog"),
    ]
    for row in rows:
        assert row["image_path"] == f"{COCO_DIR}/COCO_train2014_000000000001.jpg"
        assert (row["image_id"], row["height"], row["width"]) == ("1", H, W)
        assert (row["dataset"], row["family"]) == ("refcoco", "referring")
        assert (row["query_kind"], row["split"]) == ("phrase", "train")
        assert row["reference_answer"] is None
    assert result.skipped == {
        "invalid segmentation": 1,
        "path escapes data_root": 1,
        "image missing": 2,
        "annotation missing": 1,
        "image size differs from annotation": 1,
    }
    assert "annotations [104]: no polygon with 3 or more points" in result.examples["invalid segmentation"][0]
    assert "outside.jpg" in result.examples["path escapes data_root"][0]


def test_refcoco_masks_from_polygon_and_rle(refcoco_root, tmp_path):
    result = build_manifest("refcoco", refcoco_root, "train", tmp_path / "refcoco-train.parquet")
    rows = pq.read_table(result.path).to_pylist()
    polygon_mask = rasterize(rows[0]["mask"], H, W, refcoco_root)
    expected = np.zeros((H, W), np.uint8)
    expected[5:20, 10:30] = 1
    np.testing.assert_array_equal(polygon_mask, expected)
    assert rows[1]["mask"] == rows[0]["mask"]
    assert json.loads(rows[2]["mask"])["type"] == "coco"
    np.testing.assert_array_equal(rasterize(rows[2]["mask"], H, W, refcoco_root), _rle_mask())


def test_refcoco_other_splits(refcoco_root, tmp_path):
    val = build_manifest("refcoco", refcoco_root, "val", tmp_path / "v.parquet")
    val_rows = pq.read_table(val.path).to_pylist()
    assert [(r["sample_id"], r["query"]) for r in val_rows] == [("refcoco/val/2/0", "blue car")]
    test_b = build_manifest("refcoco", refcoco_root, "testB", tmp_path / "b.parquet")
    # REFER counts a "testAB" ref in both testA and testB.
    assert [r["query"] for r in pq.read_table(test_b.path).to_pylist()] == ["shared test", "car again"]
    test_a = build_manifest("refcoco", refcoco_root, "testA", tmp_path / "a.parquet")
    assert [r["query"] for r in pq.read_table(test_a.path).to_pylist()] == ["shared test"]


def test_split_rule_follows_refer():
    assert split_matches("testA", "testAB") and split_matches("testB", "testAB")
    assert not split_matches("testC", "testAB")
    assert split_matches("test", "testB") and not split_matches("test", "train")
    assert split_matches("train", "train") and not split_matches("val", "train") and not split_matches("train", None)


def test_refcocog_umd_and_refclef_layouts(tmp_path):
    root = tmp_path / "data"
    write_jpeg(root / COCO_DIR / "COCO_train2014_000000000042.jpg", H, W)
    write_refer_dataset(
        root, "refcocog", [make_ref(1, 11, 42, "test", ["a long description of a cat"])],
        [_image(42, "COCO_train2014_000000000042.jpg")],
        [{"id": 11, "image_id": 42, "category_id": 1, "segmentation": [rectangle_polygon(1, 1, 5, 5)]}],
        split_by="umd",
    )  # fmt: skip
    write_jpeg(root / "refer_seg" / "images" / "saiapr_tc-12" / "25" / "images" / "25000.jpg", H, W)
    write_refer_dataset(
        root, "refclef", [make_ref(2, 12, 25000, "train", ["sky"])],
        [_image(25000, "25/images/25000.jpg")],
        [{"id": 12, "image_id": 25000, "category_id": 1, "segmentation": _rle(_rle_mask())}],
    )  # fmt: skip
    refcocog = build_manifest("refcocog", root, "test", tmp_path / "g.parquet")
    (row,) = pq.read_table(refcocog.path).to_pylist()
    assert row["sample_id"] == "refcocog/test/42/0"
    assert row["image_path"] == f"{COCO_DIR}/COCO_train2014_000000000042.jpg"
    refclef = build_manifest("refclef", root, "train", tmp_path / "c.parquet")
    (row,) = pq.read_table(refclef.path).to_pylist()
    assert row["sample_id"] == "refclef/train/25000/0"
    assert row["image_path"] == "refer_seg/images/saiapr_tc-12/25/images/25000.jpg"
    np.testing.assert_array_equal(rasterize(row["mask"], H, W, root), _rle_mask())


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 1, "evil": _RunsCommand(f"touch {marker}")}], protocol=2)
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError) as error:
        load_refs(refs_path)
    assert "refused global" in str(error.value) and "system" in str(error.value) and "refs(unc).p" in str(error.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="refused global 'collections.OrderedDict'"):
        restricted_loads(pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=2))


def test_restricted_unpickler_reads_python2_byte_strings():
    # A protocol-2 pickle as Python 2 writes it: str values are SHORT_BINSTRING (bytes), here UTF-8 and Latin-1 text.
    python2_pickle = (
        b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x05caf\xc3\xa9q\x03U\x06ref_idq\x04K\x07U\x03rawq\x05U\x04na\xefvq\x06"
        b"U\x05splitq\x07X\x05\x00\x00\x00trainq\x08ua."
    )
    assert restricted_loads(python2_pickle) == [{"sent": "café", "ref_id": 7, "raw": "naïv", "split": "train"}]
    assert restricted_loads(pickle.dumps([{"a": (1, 2.5, None, True), "s": {1, 2}}], protocol=2)) == [
        {"a": (1, 2.5, None, True), "s": {1, 2}}
    ]


def test_corrupt_refs_file_is_a_clear_error(tmp_path):
    refs_path = tmp_path / "refs(unc).p"
    refs_path.write_bytes(b"\x80\x02]q\x00(K\x01")  # truncated
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p"):
        load_refs(refs_path)
    refs_path.write_bytes(pickle.dumps({"not": "a list"}, protocol=2))
    with pytest.raises(ValueError, match="expected a list of ref dicts"):
        load_refs(refs_path)
