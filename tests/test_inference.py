"""Inference: whole image, sliding window, multi-scale, flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccnet.inference import InferenceConfig, predict, sliding_window, whole
from ccnet.model import build_ccnet


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_ccnet(4, backbone="tiny").eval()
    for p in m.head.attention.parameters():
        if p.numel() == 1:
            nn.init.constant_(p, 0.5)  # gamma: make the attention count
    return m


def test_whole_is_upsampled_logits(model):
    x = torch.randn(1, 3, 40, 56)
    expected = F.interpolate(model(x)["out"], size=(40, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole(model, x), expected)


def test_single_window_equals_whole(model):
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(model, x, crop=(48, 64), stride=16), whole(model, x))
        # a crop larger than the image: one padded window, cropped back; the padding is zeros
        padded = F.pad(x, (0, 16, 0, 8))
        expected = whole(model, padded)[:, :, :48, :64]
        torch.testing.assert_close(sliding_window(model, x, crop=(56, 80), stride=40), expected)


def test_overlapping_windows_equal_whole_for_a_pointwise_model():
    """A per-pixel model gives the same logits in every window: tiling and averaging are exact."""
    torch.manual_seed(0)
    pointwise = nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 50, 37)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(pointwise, x, crop=16, stride=11), pointwise(x))


def test_overlap_average_against_explicit_windows(model):
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        got = sliding_window(model, x, crop=32, stride=16)  # windows at x = 0 and 16
        a, b = whole(model, x[..., :32]), whole(model, x[..., 16:])
    torch.testing.assert_close(got[..., :16], a[..., :16])
    torch.testing.assert_close(got[..., 16:32], (a[..., 16:] + b[..., :16]) / 2)
    torch.testing.assert_close(got[..., 32:], b[..., 16:])


def test_flip_average_is_exact_on_a_mirror_symmetric_image(model):
    half = torch.randn(1, 3, 32, 24)
    x = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric
    got = predict(model, x, InferenceConfig(flip=True))
    with torch.no_grad():
        plain = whole(model, x)
    torch.testing.assert_close(got, (plain + plain.flip(-1)) / 2)
    torch.testing.assert_close(got, got.flip(-1), rtol=0, atol=0)  # symmetric, to the bit


def test_multiscale_averages_the_scales(model):
    x = torch.randn(1, 3, 64, 64)
    got = predict(model, x, InferenceConfig(scales=(0.5, 1.0)))
    with torch.no_grad():
        small = whole(model, F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
        small = F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
        expected = (small + whole(model, x)) / 2
    torch.testing.assert_close(got, expected)
    assert predict(model, x, InferenceConfig(mode="slide", crop=48, stride=32)).shape == (1, 4, 64, 64)


def test_bad_inference_settings_raise(model):
    with pytest.raises(ValueError, match="stride"):
        sliding_window(model, torch.randn(1, 3, 8, 8), crop=4, stride=5)
    with pytest.raises(ValueError, match="mode"):
        InferenceConfig(mode="tiles")
