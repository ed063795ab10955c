"""CCNet's training loss: cross-entropy on upsampled logits, auxiliary weighting, OHEM.

total = CE(main) + 0.4 * CE(aux)  (0.4: CCNet sec. 4.1), with ignore index 255 and the logits
upsampled bilinearly to the label size first. OHEM (online hard example mining, the authors'
``OhemCrossEntropy2d``) optionally replaces the main head's CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


def upsample_to(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (N, K, h, w) logits to (N, K, *size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def ohem_mask(logits: Tensor, target: Tensor, *, thresh: float = 0.7, min_kept: int = 100_000,
              ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The pixels OHEM keeps: (N, H, W) bool.

    A valid pixel is kept when the probability of its true class is at most
    max(thresh, p_k), p_k the min_kept-th smallest such probability in the batch; when the batch
    has no more than min_kept valid pixels, all of them are kept.
    """
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid <= min_kept:
        return valid
    with torch.no_grad():
        prob = torch.softmax(logits.float(), dim=1)
        true_prob = prob.gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        true_prob = true_prob.masked_fill(~valid, float("inf"))
        threshold = thresh
        if min_kept > 0:
            kth = true_prob.flatten().kthvalue(min_kept).values.item()
            threshold = max(threshold, kth)
        return valid & (true_prob <= threshold)


def segmentation_loss(logits: Tensor, target: Tensor, *, ohem: bool = False, thresh: float = 0.7,
                      min_kept: int = 100_000, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean CE over the valid (or OHEM-kept) pixels; logits are upsampled to the target size."""
    logits = upsample_to(logits, target.shape[-2:])
    target = target.long()
    if ohem:
        keep = ohem_mask(logits, target, thresh=thresh, min_kept=min_kept, ignore_index=ignore_index)
        target = target.masked_fill(~keep, ignore_index)
    # sum / count rather than "mean": a crop with no labelled pixel gives 0, not NaN
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


class CCNetLoss(nn.Module):
    """main CE (or OHEM) + aux_weight * aux CE; returns a dict of total, main and aux losses.

    Args:
        aux_weight: weight of the auxiliary head's loss (0.4 in the paper).
        ohem: use OHEM for the main head.
        ohem_thresh, ohem_min_kept: OHEM's probability threshold and minimum pixels kept per
            batch (0.7 and 100000 in the authors' code).
        ignore_index: label value that is never scored (255).
    """

    def __init__(self, *, aux_weight: float = 0.4, ohem: bool = False, ohem_thresh: float = 0.7,
                 ohem_min_kept: int = 100_000, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.aux_weight = aux_weight
        self.ohem = ohem
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.ignore_index = ignore_index

    def forward(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        main = segmentation_loss(outputs["out"], target, ohem=self.ohem, thresh=self.ohem_thresh,
                                 min_kept=self.ohem_min_kept, ignore_index=self.ignore_index)
        losses = {"main": main, "total": main}
        if "aux" in outputs and self.aux_weight:
            aux = segmentation_loss(outputs["aux"], target, ignore_index=self.ignore_index)
            losses["aux"] = aux
            losses["total"] = main + self.aux_weight * aux
        return losses
