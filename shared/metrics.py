"""gIoU and cIoU with the semantics of LISA's public evaluation code, so numbers are comparable with the paper's.

Per mask, pixels where the ground truth is 255 are removed from both prediction and ground truth (LISA sets the
prediction to 255 there before ``intersectionAndUnionGPU``); intersection I and union U are counted for the foreground
class. Per-mask IoU is ``I / (U + 1e-5)``, plus 1.0 when U == 0 (empty ground truth and empty prediction: a correct
"no object"). gIoU is the mean per-mask IoU; cIoU is ``sum(I) / (sum(U) + 1e-10)``.

Values follow LISA's two-class histogram: a prediction pixel is foreground when it is True / 1, a ground-truth pixel
when it is 1; ground-truth values other than 0, 1 and 255, and prediction values other than 0 and 1, are rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_VALUE = 255
GIOU_EPSILON = 1e-5
CIOU_EPSILON = 1e-10


def _foregrounds(pred: np.ndarray, gt: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean HxW foregrounds of one (prediction, ground truth) pair, the prediction cleared where GT is 255."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"sample {index}: prediction shape {pred.shape} and ground-truth shape {gt.shape} differ "
                         "or are not HxW")  # fmt: skip
    if pred.dtype != np.bool_:
        if not np.issubdtype(pred.dtype, np.integer):
            raise ValueError(f"sample {index}: prediction dtype {pred.dtype}; expected bool or 0/1 integers "
                             "(threshold logits > 0 first)")  # fmt: skip
        if pred.size and (pred.min() < 0 or pred.max() > 1):
            raise ValueError(f"sample {index}: prediction values span [{pred.min()}, {pred.max()}], expected 0/1")
        pred = pred.view(np.bool_) if pred.dtype.itemsize == 1 else pred.astype(np.bool_)
    if not np.issubdtype(gt.dtype, np.integer):
        raise ValueError(f"sample {index}: ground-truth dtype {gt.dtype}; expected integers 0/1/255")
    gt_foreground = gt == 1
    gt_ignore = gt == IGNORE_VALUE
    if np.count_nonzero(gt_foreground) + np.count_nonzero(gt_ignore) + np.count_nonzero(gt == 0) != gt.size:
        raise ValueError(f"sample {index}: ground truth holds values other than 0, 1 and {IGNORE_VALUE}")
    pred_foreground = pred & ~gt_ignore
    return pred_foreground, gt_foreground


def per_sample_intersection_union(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground intersection and union of each (HxW prediction, HxW ground truth) pair, GT == 255 pixels removed.

    Returns:
        (intersection, union): int64 arrays of shape N.

    Raises:
        ValueError: different numbers of predictions and ground truths, or a pair with different shapes or bad values,
            naming the sample index.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
    intersection = np.zeros(len(gts), dtype=np.int64)
    union = np.zeros(len(gts), dtype=np.int64)
    for index, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        pred_foreground, gt_foreground = _foregrounds(pred, gt, index)
        overlap = np.count_nonzero(pred_foreground & gt_foreground)
        intersection[index] = overlap
        union[index] = np.count_nonzero(pred_foreground) + np.count_nonzero(gt_foreground) - overlap
    return intersection, union


def scores_from_counts(intersection: np.ndarray, union: np.ndarray) -> dict:
    """gIoU/cIoU and totals from per-sample foreground intersection and union (int arrays of shape N).

    Returns a dict with ``gIoU``, ``cIoU`` (floats; NaN when N == 0), ``intersection`` and ``union`` (int sums),
    ``count`` (N) and ``per_sample_iou`` (float64 array of shape N).
    """
    intersection = np.asarray(intersection, dtype=np.int64)
    union = np.asarray(union, dtype=np.int64)
    per_sample_iou = intersection / (union + GIOU_EPSILON)
    per_sample_iou[union == 0] += 1.0  # no-object target predicted as no object
    count = int(intersection.size)
    intersection_sum, union_sum = int(intersection.sum()), int(union.sum())
    return {
        "gIoU": float(per_sample_iou.mean()) if count else float("nan"),
        "cIoU": intersection_sum / (union_sum + CIOU_EPSILON) if count else float("nan"),
        "intersection": intersection_sum,
        "union": union_sum,
        "count": count,
        "per_sample_iou": per_sample_iou.astype(np.float64),
    }


def segmentation_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict:
    """LISA's gIoU and cIoU over N (prediction, ground truth) pairs.

    Args:
        preds: N HxW masks, bool or 0/1 integers (threshold logits > 0 and upsample to the original size first).
        gts: N HxW integer masks with values 0, 1 and 255 (ignore). H and W may differ between samples.

    Returns:
        ``gIoU`` (mean per-mask IoU), ``cIoU`` (sum I / sum U), ``intersection`` and ``union`` (int sums), ``count``
        and ``per_sample_iou`` (float64 array of shape N). With no samples, ``count`` is 0 and gIoU/cIoU are NaN.

    Raises:
        ValueError: a pair whose shapes differ (naming the index and both shapes), or values outside those above.
    """
    intersection, union = per_sample_intersection_union(preds, gts)
    return scores_from_counts(intersection, union)
