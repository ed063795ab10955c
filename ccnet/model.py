"""CCNet (Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019).

    model = build_ccnet(19, backbone="resnet101", recurrence=2)
    out = model(images)   # {"out": (N, classes, H/8, W/8), "aux": (N, classes, H/8, W/8)}

The forward returns logits at feature resolution (1/8 of the input); the losses upsample them
to the label size, ``ccnet.inference`` to the image size.
"""

from __future__ import annotations

import functools
from pathlib import Path

from torch import Tensor, nn

from .attention import CrissCrossAttention
from .backbone import BACKBONES, build_backbone
from .heads import FCNHead, RCCAHead
from .non_local import NonLocal2d

ATTENTION_LAYERS = {"cca": CrissCrossAttention, "non_local": NonLocal2d}


class CCNet(nn.Module):
    """Backbone + RCCA head (+ auxiliary FCN head on layer3).

    forward(images (N, 3, H, W)) -> {"out": logits, "aux": logits} at 1/8 resolution; "aux"
    only when the model has an auxiliary head.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c3, c4 = self.backbone(x)
        out = {"out": self.head(c4)}
        if self.aux_head is not None:
            out["aux"] = self.aux_head(c3)
        return out


def build_ccnet(num_classes: int, *, backbone: str = "resnet101", recurrence: int = 2,
                share_weights: bool = True, attention: str = "cca", aux: bool = True,
                head_channels: int | None = None, pretrained: str | Path | None = None,
                dropout: float = 0.1, gamma_init: float = 0.0, fused_attention: bool | None = None) -> CCNet:
    """Build CCNet.

    Args:
        num_classes: output classes.
        backbone: a key of ``ccnet.backbone.BACKBONES`` (resnet101, resnet50, resnet18, tiny).
        recurrence: R, attention passes in the head (2 in the paper; 0: no attention).
        share_weights: one attention module for all passes (the paper) or one per pass.
        attention: "cca" (criss-cross) or "non_local" (the dense baseline).
        aux: add the auxiliary FCN head on layer3 (its loss weighs 0.4).
        head_channels: inner width of both heads; 512 (the paper) for the ResNets, by default
            twice the layer4 width for smaller backbones.
        pretrained: backbone weights: None, a file path, or "hub" (see ``build_backbone``).
        dropout: Dropout2d probability before the classifiers.
        gamma_init: the attention's initial residual scale (0 in the paper's code: the identity).
        fused_attention: the criss-cross op's ``fused`` (True: never store the attention map;
            None: by size, ``ops.fused_by_default``); criss-cross attention only.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if attention not in ATTENTION_LAYERS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {sorted(ATTENTION_LAYERS)}")
    if fused_attention is not None and attention != "cca":
        raise ValueError(f"fused_attention applies to the criss-cross attention, not {attention!r}")
    body = build_backbone(backbone, pretrained=pretrained)
    c3, c4 = BACKBONES[backbone].channels
    channels = head_channels or min(512, 2 * c4)
    head = RCCAHead(c4, num_classes, channels=channels, recurrence=recurrence, share_weights=share_weights,
                    attention_layer=functools.partial(ATTENTION_LAYERS[attention], gamma_init=gamma_init,
                                                      **({"fused": fused_attention} if attention == "cca" else {})),
                    dropout=dropout)
    aux_head = FCNHead(c3, num_classes, channels=channels, dropout=dropout) if aux else None
    return CCNet(body, head, aux_head)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm layer as SyncBatchNorm, for DDP training (the paper syncs BN across GPUs)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
