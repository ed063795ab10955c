"""Inference at input resolution: whole image, sliding window, multi-scale and flip (CCNet sec. 4.1;
the authors' ``predict_sliding`` / ``predict_multiscale``).

Every function takes a batch (N, 3, H, W) and returns logits (N, K, H, W). Sliding windows are
padded to the crop size (image with 0) and their logits averaged where windows overlap;
multi-scale and flip average logits across scales and the mirrored pass, as the authors do.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import upsample_to


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str, device: torch.device | str):
    """``torch.autocast`` on the device's type for amp = "bf16" or "fp16"; a no-op for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


def _logits(model: nn.Module | Callable[[Tensor], object], x: Tensor) -> Tensor:
    """The model's main logits, in float32 (under autocast too: windows and scales sum in float32)."""
    out = model(x)
    return (out["out"] if isinstance(out, dict) else out).float()


def whole(model, images: Tensor) -> Tensor:
    """One forward pass over the whole image; logits upsampled to the image size."""
    return upsample_to(_logits(model, images), images.shape[-2:])


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins covering [0, size): every stride, the last one flush with the end."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


def sliding_window(model, images: Tensor, *, crop: int | tuple[int, int], stride: int | tuple[int, int]) -> Tensor:
    """Logits from crop-sized windows every stride pixels, averaged where they overlap.

    Windows at the border are flush with the image; an image smaller than the crop is padded
    with 0 up to the crop, and the padding's logits are dropped.
    """
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(ch, cw, sh, sw) < 1 or sh > ch or sw > cw:
        raise ValueError(f"need 1 <= stride <= crop, got crop {(ch, cw)} and stride {(sh, sw)}")
    N, _, H, W = images.shape
    total = count = None
    for y in _starts(H, ch, sh):
        for x in _starts(W, cw, sw):
            tile = images[:, :, y:y + ch, x:x + cw]
            th, tw = tile.shape[-2:]
            tile = F.pad(tile, (0, cw - tw, 0, ch - th))  # image padding: 0
            logits = whole(model, tile)[:, :, :th, :tw]
            if total is None:
                total = logits.new_zeros(N, logits.shape[1], H, W)
                count = logits.new_zeros(1, 1, H, W)
            total[:, :, y:y + th, x:x + tw] += logits
            count[:, :, y:y + th, x:x + tw] += 1
    return total / count


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How to infer: mode "whole" or "slide" (crop, stride), scales, horizontal flip.

    The authors evaluate Cityscapes with 769 crops every 513 pixels (stride 2/3 of the crop);
    multi-scale + flip uses scales such as (0.75, 1.0, 1.25, 1.5, 1.75).
    """

    mode: str = "whole"
    crop: int = 769
    stride: int = 513
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    amp: str = "none"  # none | bf16 | fp16: the forward passes under autocast; logits averaged in float32

    def __post_init__(self) -> None:
        if self.amp != "none" and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"inference mode must be 'whole' or 'slide', got {self.mode!r}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {self.scales}")


def _single_scale(model, images: Tensor, cfg: InferenceConfig) -> Tensor:
    if cfg.mode == "slide":
        return sliding_window(model, images, crop=cfg.crop, stride=cfg.stride)
    return whole(model, images)


@torch.no_grad()
def predict(model, images: Tensor, cfg: InferenceConfig = InferenceConfig()) -> Tensor:
    """Logits (N, K, H, W) for images (N, 3, H, W), averaged over scales and the flip.

    The caller puts the model in eval mode (BatchNorm statistics, no dropout).
    """
    H, W = images.shape[-2:]
    total, passes = None, 0
    for scale in cfg.scales:
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        scaled = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear",
                                                             align_corners=False)
        views = [(scaled, False)] + ([(scaled.flip(-1), True)] if cfg.flip else [])
        for view, flipped in views:
            with autocast(cfg.amp, images.device):
                logits = _single_scale(model, view, cfg)
            logits = upsample_to(logits.flip(-1) if flipped else logits, (H, W))
            total = logits if total is None else total + logits
            passes += 1
    return total / passes
