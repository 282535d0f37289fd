"""gIoU / cIoU with LISA's semantics: ignore pixels, no-object targets, per-mask vs cumulative IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.metrics import per_sample_intersection_union, segmentation_scores


def lisa_intersection_and_union(output: np.ndarray, target: np.ndarray, k: int, ignore_index: int = 255):
    """LISA's intersectionAndUnionGPU (utils/utils.py) in numpy: torch.histc(bins=K, min=0, max=K-1) == np.histogram."""
    output = output.reshape(-1).astype(np.int64).copy()
    target = target.reshape(-1).astype(np.int64)
    output[target == ignore_index] = ignore_index
    intersection = output[output == target]
    area_intersection = np.histogram(intersection, bins=k, range=(0, k - 1))[0].astype(np.float64)
    area_output = np.histogram(output, bins=k, range=(0, k - 1))[0].astype(np.float64)
    area_target = np.histogram(target, bins=k, range=(0, k - 1))[0].astype(np.float64)
    area_union = area_output + area_target - area_intersection
    return area_intersection, area_union, area_target


def lisa_scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float]:
    """LISA's validate() loop (one batch holding every mask): returns (gIoU, cIoU)."""
    intersection, union, acc_iou = 0.0, 0.0, 0.0
    for mask_i, output_i in zip(gts, preds):
        intersection_i, union_i, _ = lisa_intersection_and_union(output_i, mask_i, 2, ignore_index=255)
        intersection += intersection_i
        union += union_i
        acc_iou += intersection_i / (union_i + 1e-5)
        acc_iou[union_i == 0] += 1.0  # no-object target
    giou = (acc_iou / len(gts))[1]
    ciou = (intersection / (union + 1e-10))[1]
    return float(giou), float(ciou)


def test_ignore_pixels_are_removed_from_prediction_and_target():
    gt = np.array([[1, 1, 255], [0, 255, 255]], np.uint8)
    pred = np.array([[1, 0, 1], [1, 1, 1]], bool)  # the three predicted pixels under 255 do not count
    intersection, union = per_sample_intersection_union([pred], [gt])
    assert intersection.dtype == np.int64 and union.dtype == np.int64
    assert (intersection.tolist(), union.tolist()) == ([1], [3])  # I = {(0,0)}, U = {(0,0), (0,1), (1,0)}
    scores = segmentation_scores([pred], [gt])
    assert scores["gIoU"] == pytest.approx(1 / (3 + 1e-5), abs=1e-12)
    assert scores["cIoU"] == pytest.approx(1 / (3 + 1e-10), abs=1e-15)


def test_empty_target_scores_one_with_empty_prediction_and_zero_otherwise():
    empty_gt = np.zeros((4, 5), np.uint8)
    assert segmentation_scores([np.zeros((4, 5), bool)], [empty_gt])["gIoU"] == 1.0
    hit_nothing = segmentation_scores([np.eye(4, 5, dtype=np.uint8)], [empty_gt])
    assert (hit_nothing["gIoU"], hit_nothing["cIoU"], hit_nothing["union"]) == (0.0, 0.0, 4)


def test_all_ignore_target_has_zero_union_and_scores_one():
    scores = segmentation_scores([np.ones((3, 3), bool)], [np.full((3, 3), 255, np.uint8)])
    assert (scores["intersection"], scores["union"], scores["gIoU"]) == (0, 0, 1.0)
    assert scores["cIoU"] == 0.0  # 0 / (0 + 1e-10)


def test_mixed_batch_by_hand():
    preds = [
        np.array([[1, 0, 1], [0, 1, 1]], np.uint8),  # vs A: pred fg {(0,0), (0,2), (1,2)}; (1,1) is under ignore
        np.zeros((2, 2), np.uint8),
        np.array([[1], [0], [0]], bool),
        np.array([[True, False]]),
    ]
    gts = [
        np.array([[1, 1, 0], [0, 255, 1]], np.uint8),  # A: gt fg {(0,0), (0,1), (1,2)} -> I = 2, U = 4
        np.zeros((2, 2), np.uint8),  # B: I = 0, U = 0 -> IoU 1.0
        np.ones((3, 1), np.uint8),  # C: I = 1, U = 3
        np.zeros((1, 2), np.uint8),  # D: I = 0, U = 1 -> IoU 0.0
    ]
    scores = segmentation_scores(preds, gts)
    per_sample = [2 / (4 + 1e-5), 1.0, 1 / (3 + 1e-5), 0.0]
    np.testing.assert_allclose(scores["per_sample_iou"], per_sample, rtol=0, atol=1e-15)
    assert scores["per_sample_iou"].dtype == np.float64
    assert scores["gIoU"] == pytest.approx(sum(per_sample) / 4, abs=1e-15)  # ~0.458333
    assert scores["cIoU"] == pytest.approx(3 / (8 + 1e-10), abs=1e-15)  # (2 + 0 + 1 + 0) / (4 + 0 + 3 + 1)
    assert (scores["intersection"], scores["union"], scores["count"]) == (3, 8, 4)
    assert isinstance(scores["intersection"], int) and isinstance(scores["union"], int)


def test_empty_input_gives_nan_scores():
    scores = segmentation_scores([], [])
    assert scores["count"] == 0 and math.isnan(scores["gIoU"]) and math.isnan(scores["cIoU"])
    assert scores["per_sample_iou"].shape == (0,)


def test_shape_mismatch_names_index_and_shapes():
    preds = [np.zeros((2, 2), bool), np.zeros((3, 4), bool)]
    gts = [np.zeros((2, 2), np.uint8), np.zeros((4, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"sample 1: prediction shape \(3, 4\) and ground-truth shape \(4, 3\)"):
        segmentation_scores(preds, gts)


@pytest.mark.parametrize(
    ("pred", "gt", "message"),
    [
        (np.full((2, 2), 0.7), np.zeros((2, 2), np.uint8), "sample 0: prediction dtype float64"),
        (np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8), r"prediction values span \[255, 255\]"),
        (np.zeros((2, 2), bool), np.full((2, 2), 2, np.uint8), "values other than 0, 1 and 255"),
    ],
)
def test_bad_values_are_rejected(pred, gt, message):
    with pytest.raises(ValueError, match=message):
        segmentation_scores([pred], [gt])


def test_count_mismatch_is_rejected():
    with pytest.raises(ValueError, match="2 predictions but 1 ground-truth masks"):
        segmentation_scores([np.zeros((1, 1), bool)] * 2, [np.zeros((1, 1), np.uint8)])


def test_equals_lisa_loop_on_random_masks_with_ignore_pixels():
    rng = np.random.default_rng(7)
    preds, gts = [], []
    for index in range(50):
        height, width = rng.integers(1, 30, size=2)
        gt = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        gt[rng.random((height, width)) < 0.15] = 255
        if index % 10 == 0:
            gt[gt == 1] = 0  # some no-object targets
        pred = rng.random((height, width)) < rng.random()
        if index % 20 == 0:
            pred[:] = False
        preds.append(pred)
        gts.append(gt)
    scores = segmentation_scores(preds, gts)
    expected_giou, expected_ciou = lisa_scores([p.astype(np.uint8) for p in preds], gts)
    assert scores["count"] == 50
    assert scores["gIoU"] == pytest.approx(expected_giou, abs=1e-12)
    assert scores["cIoU"] == pytest.approx(expected_ciou, abs=1e-12)
    assert 0.0 < scores["gIoU"] < 1.0 and 0.0 < scores["cIoU"] < 1.0
