"""Mask references -> pixels: ReasonSeg polygons (LISA's rasteriser), COCO polygons/RLE, label PNGs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.masks import MaskError, coco_mask, label_png_mask, mask_ref_json, rasterize, reasonseg_mask


def shape(label: str, points: list) -> dict:
    return {"label": label, "points": points}


def lisa_get_mask_from_json(anno: dict, height: int, width: int) -> np.ndarray:
    """LISA's get_mask_from_json (utils/data_processing.py), transcribed for comparison."""
    area_list = []
    valid_poly_list = []
    for i in anno["shapes"]:
        label_id = i["label"]
        points = i["points"]
        if "flag" == label_id.lower():
            continue
        tmp_mask = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(tmp_mask, np.array([points], dtype=np.int32), True, 1, 1)
        cv2.fillPoly(tmp_mask, np.array([points], dtype=np.int32), 1)
        area_list.append(tmp_mask.sum())
        valid_poly_list.append(i)
    sort_index = list(np.argsort(area_list)[::-1].astype(np.int32))
    mask = np.zeros((height, width), dtype=np.uint8)
    for s_idx in sort_index:
        i = valid_poly_list[s_idx]
        label_value = 255 if "ignore" in i["label"].lower() else 1
        cv2.polylines(mask, np.array([i["points"]], dtype=np.int32), True, label_value, 1)
        cv2.fillPoly(mask, np.array([i["points"]], dtype=np.int32), label_value)
    return mask


def test_reasonseg_six_by_six_by_hand():
    annotation = {
        "shapes": [
            shape("target", [[3, 0], [3, 5]]),  # 2 points: column x=3, area 6, drawn last
            shape("ignore", [[1, 1], [3, 1], [3, 3], [1, 3]]),  # 3x3 square, area 9
            shape("Flag", [[0, 0], [5, 0], [5, 5], [0, 5]]),  # skipped
            shape("target", [[0, 0], [3, 0], [0, 3]]),  # triangle x + y <= 3, area 10, drawn first
        ]
    }
    expected = np.array(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 255, 255, 1, 0, 0],
            [1, 255, 255, 1, 0, 0],
            [1, 255, 255, 1, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 0, 0],
        ],
        dtype=np.uint8,
    )
    mask = reasonseg_mask(annotation, 6, 6)
    assert mask.dtype == np.uint8 and mask.shape == (6, 6)
    np.testing.assert_array_equal(mask, expected)


def test_reasonseg_small_ignore_inside_big_target_in_either_order():
    big = shape("target", [[0, 0], [9, 0], [9, 7], [0, 7]])
    small = shape("ignore region", [[3, 2], [5, 2], [5, 4], [3, 4]])
    expected = np.zeros((8, 10), np.uint8)
    expected[:, :] = 1
    expected[2:5, 3:6] = 255
    np.testing.assert_array_equal(reasonseg_mask({"shapes": [big, small]}, 8, 10), expected)
    np.testing.assert_array_equal(reasonseg_mask({"shapes": [small, big]}, 8, 10), expected)
    # the reverse nesting: a small target inside a big ignore region stays a target
    big_ignore = shape("IGNORE", big["points"])
    small_target = shape("cup", small["points"])
    expected_reverse = np.full((8, 10), 255, np.uint8)
    expected_reverse[2:5, 3:6] = 1
    np.testing.assert_array_equal(reasonseg_mask({"shapes": [small_target, big_ignore]}, 8, 10), expected_reverse)


@pytest.mark.parametrize("flag_label", ["flag", "FLAG", "Flag"])
def test_reasonseg_flag_skipped_in_any_case(flag_label):
    annotation = {"shapes": [shape(flag_label, [[0, 0], [4, 0], [4, 4], [0, 4]]), shape("t", [[1, 1], [1, 2]])]}
    expected = np.zeros((5, 5), np.uint8)
    expected[1:3, 1] = 1
    np.testing.assert_array_equal(reasonseg_mask(annotation, 5, 5), expected)


def test_reasonseg_degenerate_polygons_draw_a_line_and_a_dot():
    line = reasonseg_mask({"shapes": [shape("target", [[0, 2], [4, 2]])]}, 4, 6)
    expected_line = np.zeros((4, 6), np.uint8)
    expected_line[2, 0:5] = 1
    np.testing.assert_array_equal(line, expected_line)
    dot = reasonseg_mask({"shapes": [shape("target", [[3, 1]])]}, 4, 6)
    assert np.argwhere(dot).tolist() == [[1, 3]] and dot.sum() == 1


def test_reasonseg_float_points_truncate_and_outside_points_clip():
    floats = shape("target", [[0.9, 0.9], [3.99, 0.2], [3.7, 3.999], [-0.7, 3.5]])  # -> (0,0) (3,0) (3,3) (0,3)
    expected = np.zeros((6, 6), np.uint8)
    expected[0:4, 0:4] = 1
    np.testing.assert_array_equal(reasonseg_mask({"shapes": [floats]}, 6, 6), expected)
    outside = shape("target", [[-5, -5], [10, -5], [10, 2], [-5, 2]])
    expected_outside = np.zeros((6, 6), np.uint8)
    expected_outside[0:3, :] = 1
    np.testing.assert_array_equal(reasonseg_mask({"shapes": [outside]}, 6, 6), expected_outside)


def test_reasonseg_equals_lisa_transcription_on_random_polygons():
    rng = np.random.default_rng(0)
    for _ in range(30):
        height, width = rng.integers(5, 40, size=2)
        shapes = []
        for _ in range(rng.integers(0, 6)):
            n_points = int(rng.integers(1, 7))
            points = rng.uniform(-5, max(height, width) + 5, size=(n_points, 2)).round(1).tolist()
            label = str(rng.choice(["target", "ignore", "flag", "Ignore_1", "x"]))
            shapes.append(shape(label, points))
        annotation = {"shapes": shapes}
        np.testing.assert_array_equal(
            reasonseg_mask(annotation, int(height), int(width)), lisa_get_mask_from_json(annotation, height, width)
        )


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"text": ["q"]}, "no 'shapes' list"),
        ({"shapes": [shape("t", [[0, 0], [1, 1], [0, 1]]), {"label": "t"}]}, "shape 1 ('t'): 'points' is missing"),
        ({"shapes": [{"points": [[0, 0], [1, 1], [0, 1]]}]}, "shape 0: 'label' is None"),
        ({"shapes": [shape("t", [[0, 0], ["a", 1], [0, 1]])]}, "shape 0: point 1 is ['a', 1]"),
        ({"shapes": [shape("t", [[0, 0], [1, 2, 3]])]}, "shape 0: point 1"),
        ({"shapes": [shape("t", [])]}, "shape 0: 'points' is missing or not a non-empty list"),
        ({"shapes": [shape("t", [[0, float("nan")]])]}, "not finite"),
        ({"shapes": ["not a shape"]}, "shape 0: is str"),
    ],
)
def test_reasonseg_bad_structure_is_reported_with_shape_index(annotation, message):
    with pytest.raises(MaskError) as error:
        reasonseg_mask(annotation, 4, 4)
    assert message in str(error.value)


def test_coco_polygon_uses_pixel_centres():
    mask = coco_mask([[[1, 1, 4, 1, 4, 3, 1, 3]]], 5, 6)
    expected = np.zeros((5, 6), np.uint8)
    expected[1:3, 1:4] = 1
    np.testing.assert_array_equal(mask, expected)


# 3x4, column-major runs: 4 zeros, 3 ones, 5 zeros -> flat indices 4, 5, 6 = (row, col) (1, 1), (2, 1), (0, 2)
RLE_EXPECTED = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]], np.uint8)


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [3, 4], "counts": [4, 3, 5]},  # uncompressed
        {"size": [3, 4], "counts": "435"},  # compressed, str
        {"size": [3, 4], "counts": b"435"},  # compressed, bytes
    ],
)
def test_coco_rle_forms(rle):
    np.testing.assert_array_equal(coco_mask([rle], 3, 4), RLE_EXPECTED)


def test_coco_compressed_rle_with_delta_coding():
    # "1232": runs 1, 2, 3 and then 2 + runs[1] = 4 (COCO codes every run after the third as a delta)
    expected = np.array([[0, 1, 0, 1, 1], [1, 0, 0, 1, 1]], np.uint8)
    np.testing.assert_array_equal(coco_mask([{"size": [2, 5], "counts": "1232"}], 2, 5), expected)


def test_coco_union_of_polygon_and_rle_and_short_polygons_skipped():
    polygon = [[0, 0, 2, 0, 2, 1, 0, 1], [0, 0, 1, 1]]  # the second (4 coordinates) is skipped, not read as a box
    rle = {"size": [3, 4], "counts": [4, 3, 5]}
    expected = RLE_EXPECTED.copy()
    expected[0, 0:2] = 1
    np.testing.assert_array_equal(coco_mask([polygon, rle], 3, 4), expected)


@pytest.mark.parametrize(
    ("segmentations", "message"),
    [
        ([[[0, 0, 1, 1]]], "no valid segmentation"),
        ([{"size": [4, 4], "counts": [4, 3, 5]}], "segmentation 0: RLE size [4, 4] differs"),
        ([[[0, 0, 2, 0, 2, 2]], {"size": [3, 4], "counts": [4, 3, 4]}], "segmentation 1: uncompressed RLE counts"),
        ([{"size": [3, 4], "counts": "zzzz"}], "segmentation 0: compressed RLE counts are malformed"),
        ([{"size": [3, 4], "counts": "43"}], "do not cover 3x4"),
        ([[[0, 0, "a", 0, 2, 2]]], "segmentation 0: polygon 0 is not a list of numbers"),
        ([7], "segmentation 0: is int"),
        ("nope", "expected a list"),
    ],
)
def test_coco_bad_segmentations(segmentations, message):
    with pytest.raises(MaskError) as error:
        coco_mask(segmentations, 3, 4)
    assert message in str(error.value)


def test_label_png_mask_values():
    label = np.array([[0, 3, 7], [3, 255, 9]], np.uint16)
    expected = np.array([[255, 1, 0], [1, 255, 1]], np.uint8)
    np.testing.assert_array_equal(label_png_mask(label, [3, 9], [0, 255]), expected)


def test_rasterize_reasonseg_and_coco_from_json(tmp_path):
    reasonseg_ref = mask_ref_json({"type": "reasonseg", "shapes": [shape("target", [[0, 0], [2, 0], [2, 1], [0, 1]])]})
    expected = np.zeros((3, 4), np.uint8)
    expected[0:2, 0:3] = 1
    np.testing.assert_array_equal(rasterize(reasonseg_ref, 3, 4, tmp_path), expected)
    coco_ref = mask_ref_json({"type": "coco", "segmentations": [{"size": [3, 4], "counts": "435"}]})
    assert coco_ref == '{"segmentations":[{"counts":"435","size":[3,4]}],"type":"coco"}'
    np.testing.assert_array_equal(rasterize(coco_ref, 3, 4, tmp_path), RLE_EXPECTED)
    np.testing.assert_array_equal(rasterize(json.loads(coco_ref), 3, 4, tmp_path), RLE_EXPECTED)


def test_rasterize_palette_and_16_bit_label_pngs(tmp_path):
    label = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [5, 5, 5, 5]], np.uint8)
    palette_image = Image.fromarray(label, mode="P")
    palette_image.putpalette([200, 10, 10] * 256)  # every index has the same colour: only raw indices tell them apart
    palette_image.save(tmp_path / "palette.png")
    ref = {"type": "label_png", "path": "palette.png", "class_values": [2], "ignore_values": [5]}
    expected = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [255, 255, 255, 255]], np.uint8)
    np.testing.assert_array_equal(rasterize(mask_ref_json(ref), 3, 4, tmp_path), expected)

    deep = label.astype(np.uint16) * 1000  # 0, 1000, 2000, 3000, 5000
    (tmp_path / "sub").mkdir()
    Image.fromarray(deep).save(tmp_path / "sub" / "deep.png")
    deep_ref = {"type": "label_png", "path": "sub/deep.png", "class_values": [3000], "ignore_values": []}
    np.testing.assert_array_equal(rasterize(deep_ref, 3, 4, tmp_path), (deep == 3000).astype(np.uint8))


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ({"type": "label_png", "path": "../outside.png", "class_values": [1], "ignore_values": []}, "outside"),
        ({"type": "label_png", "path": "/etc/passwd", "class_values": [1], "ignore_values": []}, "is absolute"),
        ({"type": "label_png", "path": "label.png", "class_values": [1], "ignore_values": []}, "size 2x2 (HxW)"),
        ({"type": "label_png", "path": "missing.png", "class_values": [1], "ignore_values": []}, "missing.png not"),
        ({"type": "label_png", "path": "label.png", "class_values": ["a"], "ignore_values": []}, "'class_values'"),
        ({"type": "polygon"}, "unknown mask reference type 'polygon'"),
        ("[1, 2]", "expected an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_rasterize_errors(tmp_path, reference, message):
    data_root = tmp_path / "data"
    data_root.mkdir()
    Image.fromarray(np.ones((2, 2), np.uint8)).save(data_root / "label.png")
    (tmp_path / "outside.png").write_bytes((data_root / "label.png").read_bytes())
    with pytest.raises(MaskError) as error:
        rasterize(reference, 3, 4, data_root)
    assert message in str(error.value)


def test_mask_ref_json_is_compact_sorted_and_checks_type():
    ref = {"type": "label_png", "path": "a.png", "ignore_values": [np.int64(0)], "class_values": [3]}
    assert mask_ref_json(ref) == '{"class_values":[3],"ignore_values":[0],"path":"a.png","type":"label_png"}'
    with pytest.raises(MaskError, match="unknown mask reference type 'box'"):
        mask_ref_json({"type": "box"})
