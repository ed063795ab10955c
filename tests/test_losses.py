"""Losses: CE with ignore 255 on upsampled logits, auxiliary weighting, OHEM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ccnet.losses import CCNetLoss, ohem_mask, segmentation_loss


def logits_with_true_prob(probs: torch.Tensor, target: torch.Tensor, K: int = 3) -> torch.Tensor:
    """(1, K, 1, P) logits whose softmax gives the true class (target) probability probs."""
    P = probs.numel()
    p = torch.empty(1, K, 1, P, dtype=torch.float64)
    rest = (1 - probs) / (K - 1)
    p[:] = rest.view(1, 1, 1, P)
    p.scatter_(1, target.view(1, 1, 1, P).clamp(max=K - 1), probs.view(1, 1, 1, P).double())
    return p.log()


def test_ohem_keeps_the_pixels_below_the_threshold():
    probs = torch.tensor([0.05, 0.9, 0.3, 0.95, 0.6, 0.8, 0.1, 0.99])
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    target_ign = target.clone()
    target_ign[6] = 255  # an ignored pixel is never kept, whatever its probability
    logits = logits_with_true_prob(probs, target)
    # 3rd smallest valid probability 0.6 < 0.7: the threshold is 0.7
    keep = ohem_mask(logits, target_ign.view(1, 1, -1), thresh=0.7, min_kept=3)
    assert keep.flatten().tolist() == [True, False, True, False, True, False, False, False]
    # 5th smallest valid is 0.9 > 0.7: keep everything up to 0.9
    keep = ohem_mask(logits, target_ign.view(1, 1, -1), thresh=0.7, min_kept=5)
    assert keep.flatten().tolist() == [True, True, True, False, True, True, False, False]
    # no more valid pixels than min_kept: every valid pixel is kept
    keep = ohem_mask(logits, target_ign.view(1, 1, -1), thresh=0.7, min_kept=7)
    assert keep.flatten().tolist() == [True] * 6 + [False, True]


def test_ohem_loss_averages_over_kept_pixels():
    probs = torch.tensor([0.05, 0.9, 0.3, 0.95])
    target = torch.tensor([0, 1, 2, 0])
    logits = logits_with_true_prob(probs, target).float()
    loss = segmentation_loss(logits, target.view(1, 1, -1), ohem=True, thresh=0.7, min_kept=1)
    expected = -(math.log(0.05) + math.log(0.3)) / 2
    assert abs(loss.item() - expected) < 1e-5


def test_loss_ignores_255_and_upsamples():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 4, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 10))
    target[:, :3] = 255
    loss = segmentation_loss(logits, target)
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    valid = target != 255
    logp = torch.log_softmax(up, 1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(loss, -logp[valid].mean())
    # ignored pixels do not move the loss: the gradient of their logits (at label size) is zero
    up_leaf = up.detach().requires_grad_(True)
    segmentation_loss(up_leaf, target).backward()
    assert up_leaf.grad[:, :, :3].abs().max() == 0 and up_leaf.grad[:, :, 3:].abs().max() > 0


def test_all_ignored_crop_gives_zero_not_nan():
    loss = segmentation_loss(torch.randn(1, 3, 4, 4, requires_grad=True), torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()


def test_total_is_main_plus_04_aux():
    torch.manual_seed(0)
    outputs = {"out": torch.randn(2, 3, 4, 4), "aux": torch.randn(2, 3, 4, 4)}
    target = torch.randint(0, 3, (2, 16, 16))
    losses = CCNetLoss()(outputs, target)
    main, aux = segmentation_loss(outputs["out"], target), segmentation_loss(outputs["aux"], target)
    torch.testing.assert_close(losses["main"], main)
    torch.testing.assert_close(losses["aux"], aux)
    torch.testing.assert_close(losses["total"], main + 0.4 * aux)
    ohem = CCNetLoss(ohem=True, ohem_min_kept=10)(outputs, target)
    torch.testing.assert_close(ohem["aux"], aux)  # OHEM is for the main head only
