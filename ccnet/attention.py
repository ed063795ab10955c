"""Criss-cross attention module (CCNet, Huang et al., ICCV 2019, sec. 3.2).

Query and key 1x1 convs reduce C to C / 8, the value conv keeps C; the attention of every
pixel over its row and column (``ops.criss_cross_attention``) is scaled by a learnable
``gamma``, initialised to 0 so that a fresh module is the identity (the paper's code), and added
to the input. The branch's gradients are scaled by gamma, so from 0 one pass can stay unused
(``gamma_init``; see the README's ablation).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

import ops


class CrissCrossAttention(nn.Module):
    """out = gamma * CCA(Q, K, V) + x, with Q, K = 1x1 convs C -> C / reduction, V = 1x1 conv C -> C.

    Args:
        channels: C, the input (and output) channels.
        reduction: query/key channel reduction (8 in the paper).
        attention: the attention function ``(q, k, v) -> out``; the criss-cross op by default.
        gamma_init: gamma's initial value; 0 (the paper's code) makes a fresh module the identity.
        fused: the op's ``fused``: True never stores the attention map (``ops.fused``), False
            always does, None (the default) lets the op choose by size (``ops.fused_by_default``).
    """

    def __init__(self, channels: int, *, reduction: int = 8, attention=ops.criss_cross_attention,
                 gamma_init: float = 0.0, fused: bool | None = None) -> None:
        super().__init__()
        if channels < reduction:
            raise ValueError(f"channels ({channels}) must be at least the reduction ({reduction})")
        inner = channels // reduction
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))
        self.attention = attention if fused is None else functools.partial(attention, fused=fused)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H, W)
        out = self.attention(self.query(x), self.key(x), self.value(x))
        return self.gamma * out + x


def pass_weights(q: Tensor, k: Tensor) -> Tensor:
    """(N, H + W - 1, H, W) in float32: every pixel's softmax over its row and column, in the
    op's slot layout (``ops.reference``: the row first, then the column without the pixel)."""
    from ops import reference

    return torch.softmax(reference.energy(q.float(), k.float()), dim=1)


def _cross(weights: Tensor, y: int, x: int) -> Tensor:
    """(N, H, W): pixel (y, x)'s slot weights put back on its row and column; zero elsewhere."""
    from ops.reference import column_pixels

    N, _, H, W = weights.shape
    out = weights.new_zeros(N, H, W)
    out[:, y, :] = weights[:, :W, y, x]
    out[:, column_pixels(H, weights.device)[y], x] = weights[:, W:, y, x]
    return out


def pixel_attention(q: Tensor, k: Tensor, y: int, x: int) -> Tensor:
    """(N, H, W): the weights with which pixel (y, x) gathers its row and column in one pass (the
    softmax over the H + W - 1 slots, the pixel itself once, in float32); zero off its cross."""
    return _cross(pass_weights(q, k), y, x)


@torch.no_grad()
def attention_maps(model: nn.Module, images: Tensor, pixel: tuple[int, int], *,
                   image_pixel: bool = False) -> list[Tensor]:
    """Where the feature pixel ``pixel`` (y, x) of the head's map draws its information from,
    after each of the R criss-cross passes: a list of R (N, H, W) maps, each summing to 1.
    With ``image_pixel``, ``pixel`` is in the images' coordinates, and the feature pixel is the
    one that covers it.

    After pass 1 it is the pixel's own attention over its cross. After pass r it composes the
    passes: the pixel's pass-r weights over its cross, each spread by that pixel's map after
    pass r - 1 (the residual path ignored), so after two passes it covers the whole image, as in
    the paper's figure 1 and its visualisations.
    """
    head = model.head if hasattr(model, "head") else model
    inputs: list[tuple[nn.Module, Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
             for m in head.attention if isinstance(m, CrissCrossAttention)]
    try:
        model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    if not inputs:
        raise ValueError("the model has no criss-cross attention pass (recurrence 0, or non_local)")
    _, _, H, W = inputs[0][1].shape
    if image_pixel:
        pixel = (pixel[0] * H // images.shape[2], pixel[1] * W // images.shape[3])
    if not (0 <= pixel[0] < H and 0 <= pixel[1] < W):
        raise ValueError(f"pixel {pixel} is outside the {H}x{W} feature map")
    weights = [pass_weights(module.query(x), module.key(x)) for module, x in inputs]  # once per pass
    return [_composed(weights[: r + 1], pixel) for r in range(len(weights))]


def _composed(weights: list[Tensor], pixel: tuple[int, int]) -> Tensor:
    """The map of ``pixel`` after len(weights) passes: its own weights over its cross, each spread
    by that cross pixel's map after the passes before (recursive: (H + W - 1) ** (R - 1) maps)."""
    own = _cross(weights[-1], *pixel)
    if len(weights) == 1:
        return own
    N, H, W = own.shape
    out = torch.zeros_like(own)
    y0, x0 = pixel
    for yy, xx in [(y0, c) for c in range(W)] + [(c, x0) for c in range(H) if c != y0]:
        out += own[:, yy, xx].view(N, 1, 1) * _composed(weights[:-1], (yy, xx))
    return out
