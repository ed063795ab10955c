"""Export CCNet for deployment with ``torch.export``.

The exported program uses the pure-PyTorch attention (``ops.reference``), so it runs wherever
PyTorch runs, without the compiled extension. Height and width are dynamic by default (the
backbone needs them to be multiples of 8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import ops


class _Logits(nn.Module):
    """The model's main logits at the input resolution: what a deployment consumes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images)["out"]
        return nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def export_model(model: nn.Module, example: Tensor, *, dynamic: bool = True) -> torch.export.ExportedProgram:
    """torch.export of ``images (N, 3, H, W) -> logits (N, K, H, W)`` in eval mode.

    Args:
        model: a CCNet (``build_ccnet``).
        example: an example batch; with ``dynamic``, batch, height and width may vary
            (height and width as multiples of 8).
    """
    wrapper = _Logits(model).eval()
    shapes = None
    if dynamic:
        h8, w8 = torch.export.Dim("h8", min=2, max=1024), torch.export.Dim("w8", min=2, max=1024)
        shapes = {"images": {0: torch.export.Dim("batch", min=1, max=1024), 2: 8 * h8, 3: 8 * w8}}
    with ops.use_implementation("reference"):
        return torch.export.export(wrapper, (example,), dynamic_shapes=shapes)
