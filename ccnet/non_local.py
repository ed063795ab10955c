"""Non-local block, embedded Gaussian (Wang et al., "Non-local Neural Networks", CVPR 2018).

Kept as the dense baseline of CCNet's efficiency comparison (CCNet sec. 4.3): the same
1x1 query/key convs C -> C / 8 and value conv C -> C as ``CrissCrossAttention``, the same
gamma-scaled residual, but every pixel attends to all H * W pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import CrissCrossAttention


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q^T k) v over all pixels: q, k (N, C', H, W), v (N, C, H, W) -> (N, C, H, W)."""
    N, C, H, W = v.shape
    energy = torch.einsum("ncp,ncq->npq", q.flatten(2), k.flatten(2))  # (N, HW, HW)
    attn = torch.softmax(energy, dim=-1)
    return torch.einsum("npq,ncq->ncp", attn, v.flatten(2)).view(N, C, H, W)


class NonLocal2d(CrissCrossAttention):
    """Embedded-Gaussian non-local block with CrissCrossAttention's layers and residual.

    Args:
        channels: C, the input (and output) channels.
        reduction: query/key channel reduction (8, as in CCNet's comparison).
    """

    def __init__(self, channels: int, *, reduction: int = 8, gamma_init: float = 0.0) -> None:
        super().__init__(channels, reduction=reduction, attention=dense_attention, gamma_init=gamma_init)
