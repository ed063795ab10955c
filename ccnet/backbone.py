"""Dilated backbones at output stride 8 (CCNet sec. 3.1: layer3 dilation 2, layer4 dilation 4).

Every backbone returns ``(layer3, layer4)`` feature maps at 1/8 of the input: layer3 feeds the
auxiliary head, layer4 the RCCA head. The ResNets come from timm (``features_only=True,
output_stride=8``); ``resnet50`` and ``resnet101`` are timm's deep-stem "s" variants (three 3x3
stem convs 3 -> 64 -> 64 -> 128, the stem of the authors' ResNet-101). ``tiny`` is a small CNN
of our own with a receptive field of 79 pixels, for CPU runs in minutes and for
showing what long-range context adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it and its (layer3, layer4) channels."""

    build: Callable[[str | Path | None], nn.Module]
    channels: tuple[int, int]
    description: str


def _timm(name: str) -> Callable[[str | Path | None], nn.Module]:
    def build(pretrained: str | Path | None) -> nn.Module:
        import timm

        kwargs = {}
        if pretrained not in (None, "hub"):
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights {str(path)!r} not found")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        return timm.create_model(name, features_only=True, output_stride=8, out_indices=(3, 4),
                                 pretrained=pretrained is not None, **kwargs)
    return build


class TinyBackbone(nn.Module):
    """Four conv stages, three of stride 2, layer4 dilated: (N, 3, H, W) -> 1/8, (32, 64) ch."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(block(3, width // 2, 2), block(width // 2, width, 2))
        self.layer3 = nn.Sequential(block(width, width, 2), block(width, width))
        self.layer4 = nn.Sequential(block(width, 2 * width, dilation=2), block(2 * width, 2 * width))

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.layer3(self.stem(x))
        return [c3, self.layer4(c3)]


def _tiny(pretrained: str | Path | None) -> nn.Module:
    model = TinyBackbone()
    if pretrained == "hub":
        raise ValueError("the tiny backbone has no published weights; pass a file path or None")
    if pretrained is not None:
        model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
    return model


BACKBONES: dict[str, BackboneSpec] = {
    "resnet101": BackboneSpec(_timm("resnet101s"), (1024, 2048), "ResNet-101, deep stem (the paper's)"),
    "resnet50": BackboneSpec(_timm("resnet50s"), (1024, 2048), "ResNet-50, deep stem"),
    "resnet18": BackboneSpec(_timm("resnet18"), (256, 512), "ResNet-18"),
    "tiny": BackboneSpec(_tiny, (32, 64), "small CNN for CPU runs, receptive field 79 px"),
}


def build_backbone(name: str, *, pretrained: str | Path | None = None) -> nn.Module:
    """A registered backbone returning [layer3, layer4] at output stride 8.

    Args:
        name: a key of ``BACKBONES``.
        pretrained: None (random init), a path to a weights file (timm's format for the
            ResNets: the classification model's state dict), or ``"hub"`` to download the
            library's ImageNet weights (needs the internet).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name].build(pretrained)
