"""Criss-cross attention module (CCNet, Huang et al., ICCV 2019, sec. 3.2).

Query and key 1x1 convs reduce C to C / 8, the value conv keeps C; the attention of every
pixel over its row and column (``ops.criss_cross_attention``) is scaled by a learnable
``gamma``, initialised to 0 so that a fresh module is the identity, and added to the input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import ops


class CrissCrossAttention(nn.Module):
    """out = gamma * CCA(Q, K, V) + x, with Q, K = 1x1 convs C -> C / reduction, V = 1x1 conv C -> C.

    Args:
        channels: C, the input (and output) channels.
        reduction: query/key channel reduction (8 in the paper).
        attention: the attention function ``(q, k, v) -> out``; the criss-cross op by default.
    """

    def __init__(self, channels: int, *, reduction: int = 8, attention=ops.criss_cross_attention) -> None:
        super().__init__()
        if channels < reduction:
            raise ValueError(f"channels ({channels}) must be at least the reduction ({reduction})")
        inner = channels // reduction
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))  # 0: the module starts as the identity
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H, W)
        out = self.attention(self.query(x), self.key(x), self.value(x))
        return self.gamma * out + x
