"""CCNet's heads (Huang et al., ICCV 2019, sec. 3.1; the authors' ``RCCAModule``).

RCCA head on layer4: 3x3 conv C_in -> C + BN + act; the criss-cross attention applied R times
(one shared module by default, so the second pass reuses the first pass's weights); 3x3 conv
C -> C + BN + act; concatenation with the backbone feature; 3x3 conv -> C + BN + act;
Dropout2d(0.1); 1x1 conv -> classes. The auxiliary FCN head on layer3: 3x3 conv -> C + BN +
act, Dropout2d(0.1), 1x1 conv -> classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention import CrissCrossAttention


class ConvBNAct(nn.Sequential):
    """3x3 (or k x k) conv without bias, norm, activation."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d,
                 act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(out_channels),
            act_layer(),
        )


class RCCAHead(nn.Module):
    """Recurrent criss-cross attention head.

    Args:
        in_channels: channels of the backbone's last stage (2048 for ResNet-50/101).
        num_classes: output classes.
        channels: inner width (512 in the paper).
        recurrence: R, how many times attention is applied (2 in the paper; 0: no attention,
            the baseline).
        share_weights: one attention module for all R passes (the paper), or one per pass.
        attention_layer: the attention block class (``CrissCrossAttention``, or ``NonLocal2d``
            for the comparison).
        norm_layer, act_layer: normalisation and activation classes.
        dropout: Dropout2d probability before the classifier (0.1 in the paper).
    """

    def __init__(self, in_channels: int, num_classes: int, *, channels: int = 512, recurrence: int = 2,
                 share_weights: bool = True,
                 attention_layer: Callable[[int], nn.Module] = CrissCrossAttention,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d, act_layer: type[nn.Module] = nn.ReLU,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if recurrence < 0:
            raise ValueError(f"recurrence must be >= 0, got {recurrence}")
        self.recurrence = recurrence
        self.conva = ConvBNAct(in_channels, channels, norm_layer=norm_layer, act_layer=act_layer)
        n_modules = (1 if share_weights else recurrence) if recurrence else 0
        self.attention = nn.ModuleList(attention_layer(channels) for _ in range(n_modules))
        self.convb = ConvBNAct(channels, channels, norm_layer=norm_layer, act_layer=act_layer)
        self.bottleneck = ConvBNAct(in_channels + channels, channels, norm_layer=norm_layer,
                                    act_layer=act_layer)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, h, w) -> (N, classes, h, w)
        out = self.conva(x)
        for i in range(self.recurrence):
            out = self.attention[i % len(self.attention)](out)
        out = self.bottleneck(torch.cat([x, self.convb(out)], dim=1))
        return self.classifier(out)


class FCNHead(nn.Sequential):
    """Auxiliary head: 3x3 conv + BN + act, Dropout2d, 1x1 conv -> classes.

    Args:
        in_channels: channels of the backbone's third stage (1024 for ResNet-50/101).
        num_classes: output classes.
        channels: inner width (512 in the authors' code; mmseg uses 256).
    """

    def __init__(self, in_channels: int, num_classes: int, *, channels: int = 512,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d, act_layer: type[nn.Module] = nn.ReLU,
                 dropout: float = 0.1) -> None:
        super().__init__(
            ConvBNAct(in_channels, channels, norm_layer=norm_layer, act_layer=act_layer),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )
