"""Paired image / label transforms, in the style of torchvision's segmentation reference.

Each transform takes and returns ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)`` and draws
its randomness from the ``numpy.random.Generator`` it is given, so an augmented sample is a
function of (seed, epoch, key) alone, wherever and in whatever order it is computed. Labels are
resized with nearest neighbour and padded with 255 (ignore); images padded with 0.
"""

from __future__ import annotations

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    def __init__(self, transforms) -> None:
        self.transforms = transforms

    def __call__(self, image, label, rng: np.random.Generator):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label


class RandomScale:
    """Resize by a factor drawn uniformly from [low, high] (CCNet: 0.7-2.1 on Cityscapes)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, image, label, rng):
        s = rng.uniform(self.low, self.high)
        h, w = label.shape
        size = (max(1, round(w * s)), max(1, round(h * s)))  # cv2: (width, height)
        return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


class RandomCrop:
    """A size x size crop at a random place, padding image with 0 and label with 255 first."""

    def __init__(self, size: int, ignore_index: int = 255) -> None:
        self.size, self.ignore_index = size, ignore_index

    def __call__(self, image, label, rng):
        h, w = label.shape
        ph, pw = max(self.size - h, 0), max(self.size - w, 0)
        if ph or pw:
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index)
        h, w = label.shape
        y, x = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        return image[y:y + self.size, x:x + self.size], label[y:y + self.size, x:x + self.size]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image, label, rng):
        if rng.random() < self.p:
            return image[:, ::-1], label[:, ::-1]
        return image, label


class PhotometricJitter:
    """Brightness and contrast shifts, each with probability 0.5 (a light photometric distortion)."""

    def __init__(self, brightness: float = 32, contrast: float = 0.5) -> None:
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, image, label, rng):
        out = image.astype(np.float32)
        if rng.random() < 0.5:
            out += rng.uniform(-self.brightness, self.brightness)
        if rng.random() < 0.5:
            out *= rng.uniform(1 - self.contrast, 1 + self.contrast)
        return np.clip(out, 0, 255).astype(np.uint8), label


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, scaled to [0, 1] and standardised."""
    out = (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def training_transform(crop: int, *, scale: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                       jitter: bool = False) -> Compose:
    """Random scale, crop (pad 0 / 255), horizontal flip, optional photometric jitter."""
    steps = [RandomScale(*scale), RandomCrop(crop)]
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter:
        steps.append(PhotometricJitter())
    return Compose(steps)
