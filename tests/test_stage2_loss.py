"""Stage-2 mask loss: BCE + DICE with ignore pixels, checked against hand-computed values and LISA's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stage2_segment.loss import mask_loss


def _lisa_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """LISA's sigmoid_ce_loss and dice_loss (num_masks = batch size), for inputs without ignore pixels."""
    batch = logits.shape[0]
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1).sum() / (batch + 1e-8)
    probs = logits.sigmoid().flatten(1)
    flat_target = target.flatten(1)
    numerator = 2 * (probs / 1000 * flat_target).sum(-1)
    denominator = (probs / 1000).sum(-1) + (flat_target / 1000).sum(-1)
    dice = (1 - (numerator + 1e-6) / (denominator + 1e-6)).sum() / (batch + 1e-8)
    return bce.item(), dice.item()


def test_hand_computed_with_an_ignore_pixel():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 0.0]]]])
    target = torch.tensor([[[[1, 0], [255, 1]]]], dtype=torch.uint8)
    terms = mask_loss(logits, target)

    expected_bce = (math.log(2) + math.log(1 + math.e**2) + math.log(2)) / 3
    sig2 = 1 / (1 + math.exp(-2))
    numerator = 2 * (0.5 + 0.5) / 1000
    denominator = (0.5 + sig2 + 0.5) / 1000 + 2 / 1000
    expected_dice = 1 - (numerator + 1e-6) / (denominator + 1e-6)
    assert terms.bce.item() == pytest.approx(expected_bce, rel=1e-6)
    assert terms.dice.item() == pytest.approx(expected_dice, rel=1e-5)
    assert terms.total.item() == pytest.approx(expected_bce + 0.5 * expected_dice, rel=1e-5)


def test_ignore_pixels_do_not_change_the_loss():
    target = torch.tensor([[[1, 0, 255], [1, 255, 0]]], dtype=torch.uint8)
    logits = torch.tensor([[[0.3, -0.2, 0.0], [1.5, 0.0, -2.0]]])
    changed = logits.clone()
    changed[target == 255] = torch.tensor([50.0, -50.0])
    base, other = mask_loss(logits, target), mask_loss(changed, target)
    assert other.bce.item() == pytest.approx(base.bce.item(), rel=1e-6)
    assert other.dice.item() == pytest.approx(base.dice.item(), rel=1e-6)


def test_matches_lisa_without_ignore_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=generator) * 3
    target = (torch.rand(3, 1, 16, 16, generator=generator) > 0.6).float()
    terms = mask_loss(logits, target)
    lisa_bce, lisa_dice = _lisa_losses(logits[:, 0], target[:, 0])
    assert terms.bce.item() == pytest.approx(lisa_bce, rel=1e-5)
    assert terms.dice.item() == pytest.approx(lisa_dice, rel=1e-5)


def test_perfect_prediction_is_near_zero():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    target[0, 0, 2:5, 2:6] = 1
    target[1, 0, :, :3] = 1
    target[1, 0, 7, 7] = 255
    logits = torch.where(target == 1, 30.0, -30.0)
    terms = mask_loss(logits, target)
    assert terms.dice.item() < 1e-6
    assert terms.bce.item() < 1e-9
    assert terms.total.item() < 1e-6
    wrong = mask_loss(-logits, target)
    assert wrong.dice.item() > 0.99 and wrong.bce.item() > 25


def test_per_sample_average_and_fully_ignored_sample():
    """Each sample's BCE is a mean over its own valid pixels; a sample with no valid pixel adds zero."""
    logits = torch.zeros(2, 2, 2)
    target = torch.tensor([[[1, 255], [255, 255]], [[255, 255], [255, 255]]], dtype=torch.uint8)
    terms = mask_loss(logits, target)
    assert terms.bce.item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    one_pixel_dice = 1 - (2 * 0.5 / 1000 + 1e-6) / ((0.5 + 1) / 1000 + 1e-6)
    assert terms.dice.item() == pytest.approx(one_pixel_dice / 2, rel=1e-5)


def test_weights_and_shape_errors():
    logits = torch.tensor([[[1.0, -1.0]]])
    target = torch.tensor([[[1, 1]]])
    terms = mask_loss(logits, target, bce_weight=2.0, dice_weight=3.0)
    assert terms.total.item() == pytest.approx(2.0 * terms.bce.item() + 3.0 * terms.dice.item(), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        mask_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
