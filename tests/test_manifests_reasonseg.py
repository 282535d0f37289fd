"""ReasonSeg adapter on a hand-made ReasonSeg folder: rows, queries, references, masks, and every skip reason."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from manifests.registry import build_manifest
from shared.masks import rasterize

from fixtures_datasets import reasonseg_shape, write_jpeg, write_reasonseg_explanatory, write_reasonseg_item

TARGET = reasonseg_shape("target", [[10, 5], [29, 5], [29, 19], [10, 19]])
SMALL_IGNORE = reasonseg_shape("ignore", [[12, 7], [15, 7], [15, 10], [12, 10]])
FLAG = reasonseg_shape("flag", [[40, 30], [50, 30], [50, 35]])


def _expected_target_mask() -> np.ndarray:
    """40x60: target rectangle 1, the smaller ignore rectangle inside it 255 (drawn later), flag not drawn."""
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 10:30] = 1
    mask[7:11, 12:16] = 255
    return mask


@pytest.fixture
def reasonseg_root(tmp_path):
    root = tmp_path / "data"
    write_reasonseg_item(
        root, "train", "img_a", ["What could hold hot tea?", "Which object keeps a drink warm?"], True,
        [TARGET, SMALL_IGNORE, FLAG],
    )  # fmt: skip
    write_reasonseg_item(root, "train", "img_cp1252", ["the café sign"], False, [TARGET], encoding="cp1252")
    write_reasonseg_item(root, "train", "img_no_image", ["q1", "q2"], True, [TARGET], with_image=False)
    bad = write_reasonseg_item(root, "train", "img_bad_json", ["q"], True, [TARGET])
    bad.write_text('{"text": ["q"], "is_sentence": tru')
    write_reasonseg_item(root, "train", "img_bad_points", ["q"], True, [reasonseg_shape("target", [[1, "x"], [2, 3]])])
    write_reasonseg_item(root, "train", "img_flag_only", ["q"], True, [FLAG])
    write_jpeg(root / "reason_seg" / "ReasonSeg" / "train" / "img_no_json.jpg", 40, 60)
    write_reasonseg_item(root, "train", "img_empty_query", ["", "  the mug  "], False, [TARGET])

    write_reasonseg_item(root, "val", "v1", ["Which thing holds soup?", "second query, unused in val"], True, [TARGET])
    write_reasonseg_item(root, "val", "v2", ["the bowl"], False, [TARGET, SMALL_IGNORE], size=(50, 70))
    write_reasonseg_explanatory(
        root,
        "val",
        [
            {"image": "v1.jpg", "query": "something else", "outputs": "by image only"},
            {"image": "v1.jpg", "query": "Which thing holds soup?", "outputs": "A bowl holds soup."},
            {"image": "v2.jpg", "query": "another query", "outputs": "The bowl, by its image."},
        ],
    )
    return root


def _build(root, split, tmp_path):
    result = build_manifest("reasonseg", root, split, tmp_path / f"reasonseg-{split}.parquet")
    return result, pq.read_table(result.path).to_pylist()


def test_train_rows_one_per_query(reasonseg_root, tmp_path):
    result, rows = _build(reasonseg_root, "train", tmp_path)
    assert [r["sample_id"] for r in rows] == [
        "reasonseg/train/img_a/0",
        "reasonseg/train/img_a/1",
        "reasonseg/train/img_cp1252/0",
        "reasonseg/train/img_empty_query/1",
    ]
    by_id = {r["sample_id"]: r for r in rows}
    first = by_id["reasonseg/train/img_a/0"]
    assert first["query"] == "What could hold hot tea?" and first["query_kind"] == "sentence"
    assert by_id["reasonseg/train/img_a/1"]["query"] == "Which object keeps a drink warm?"
    assert first["image_path"] == "reason_seg/ReasonSeg/train/img_a.jpg"
    assert (first["image_id"], first["height"], first["width"]) == ("img_a", 40, 60)
    assert (first["dataset"], first["family"], first["split"], first["reference_answer"]) == (
        "reasonseg", "reasoning", "train", None,
    )  # fmt: skip
    cp1252 = by_id["reasonseg/train/img_cp1252/0"]
    assert cp1252["query"] == "the café sign" and cp1252["query_kind"] == "phrase"
    assert by_id["reasonseg/train/img_empty_query/1"]["query"] == "the mug"
    assert all(r["image_path"] == f"reason_seg/ReasonSeg/train/{r['image_id']}.jpg" for r in rows)

    assert result.rows == 4
    assert result.skipped == {
        "image missing": 2,  # both queries of img_no_image
        "unreadable json": 1,
        "invalid polygon": 1,
        "no polygon": 1,
        "annotation missing": 1,
        "empty query": 1,
    }
    assert "img_no_image" in result.examples["image missing"][0]
    assert "img_bad_json.json" in result.examples["unreadable json"][0]
    assert "shapes[0]" in result.examples["invalid polygon"][0]
    assert result.summary().startswith("reasonseg/train: 4 rows, 7 skipped (image missing: 2, ")


def test_train_masks_rasterise_to_lisa_semantics(reasonseg_root, tmp_path):
    _, rows = _build(reasonseg_root, "train", tmp_path)
    first = rows[0]
    ref = json.loads(first["mask"])
    assert ref["type"] == "reasonseg" and [s["label"] for s in ref["shapes"]] == ["target", "ignore"]
    mask = rasterize(first["mask"], first["height"], first["width"], reasonseg_root)
    np.testing.assert_array_equal(mask, _expected_target_mask())
    only_target = rasterize(rows[2]["mask"], 40, 60, reasonseg_root)
    assert int((only_target == 1).sum()) == 15 * 20 and int((only_target == 255).sum()) == 0


def test_val_uses_first_query_and_reference_answers(reasonseg_root, tmp_path):
    result, rows = _build(reasonseg_root, "val", tmp_path)
    assert result.rows == 2 and result.skipped == {}
    v1, v2 = rows
    assert (v1["sample_id"], v1["query"]) == ("reasonseg/val/v1/0", "Which thing holds soup?")
    assert v1["query_kind"] == "sentence"
    assert v1["reference_answer"] == "A bowl holds soup."  # matched by image and query
    assert (v2["sample_id"], v2["query"], v2["query_kind"]) == ("reasonseg/val/v2/0", "the bowl", "phrase")
    assert v2["reference_answer"] == "The bowl, by its image."  # matched by image only
    assert (v2["height"], v2["width"]) == (50, 70)
    mask = rasterize(v2["mask"], 50, 70, reasonseg_root)
    assert mask.shape == (50, 70) and int((mask == 1).sum()) == 15 * 20 - 16 and int((mask == 255).sum()) == 16


def test_image_file_escaping_root_is_skipped(tmp_path):
    root = tmp_path / "data"
    outside = write_jpeg(tmp_path / "outside.jpg", 40, 60)
    write_reasonseg_item(root, "val", "linked", ["the thing"], False, [TARGET], with_image=False)
    write_reasonseg_item(root, "val", "kept", ["the other thing"], False, [TARGET])
    (root / "reason_seg" / "ReasonSeg" / "val" / "linked.jpg").symlink_to(outside)
    result, rows = _build(root, "val", tmp_path)
    assert [r["sample_id"] for r in rows] == ["reasonseg/val/kept/0"]
    assert result.skipped == {"path escapes data_root": 1}
