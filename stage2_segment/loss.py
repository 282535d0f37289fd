"""Segmentation loss (paper Eq. 5): ``bce_weight * BCE + dice_weight * DICE``, ignore pixels excluded from both terms.

Per sample, like LISA's ``sigmoid_ce_loss`` and ``dice_loss``: BCE is the mean over that sample's valid pixels;
DICE is ``1 - (2 * sum(p * t) / s + eps) / ((sum(p) + sum(t)) / s + eps)`` with p = sigmoid(logits), scale s = 1000
and eps = 1e-6, sums over valid pixels. Both terms are then averaged over the samples; a sample without valid pixels
adds 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_LABEL = 255
DICE_SCALE = 1000.0
DICE_EPS = 1e-6


class MaskLoss(NamedTuple):
    """Weighted total and its unweighted components, each a scalar tensor."""

    total: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 0.5,
    ignore_label: int = IGNORE_LABEL,
) -> MaskLoss:
    """Loss between mask logits and labels at the same resolution.

    Args:
        logits: Bx1xHxW or BxHxW mask logits.
        target: same shape (or BxHxW beside Bx1xHxW logits), labels 0/1, ``ignore_label`` = excluded.
    """
    if logits.dim() == 4 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    logits = logits.flatten(1).float()
    target = target.flatten(1)
    valid = (target != ignore_label).float()
    target = (target == 1).float() * valid

    per_pixel_bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    bce = (per_pixel_bce.sum(1) / valid.sum(1).clamp(min=1.0)).mean()

    probs = logits.sigmoid() * valid
    numerator = 2 * (probs / DICE_SCALE * target).sum(1)
    denominator = (probs / DICE_SCALE).sum(1) + (target / DICE_SCALE).sum(1)
    dice = (1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)).mean()

    total = bce_weight * bce + dice_weight * dice
    return MaskLoss(total=total, bce=bce, dice=dice)
