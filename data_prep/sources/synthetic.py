"""A synthetic dataset that needs long-range context (made for criss-cross attention).

Every image is ``size`` x ``size`` pixels of background texture (class 0) with 1 to
``max_objects`` rectangles. All rectangles share one texture, so their class (1 .. K-1) cannot
be told by looking at them or at their surroundings. The class is written elsewhere, as a
*key*: a strip of the class's colour on the image border, on the rectangle's rows (left
border) or on its columns (top border), chosen per image. Rectangles keep at least ``gap``
pixels away from the keyed border (more than the ``tiny`` backbone's receptive field
reaches), and rectangles of one image never share rows (row keys) or columns (column keys),
so each key names exactly one object.

So a pixel's class is fixed by information on its own row or column, ``gap`` or more pixels
away. One criss-cross attention pass reaches it (and learns to read it when the attention's
gamma starts at 1; from the paper's 0 a single pass mostly stays unused: README, "The ablation"); a
model that only sees a neighbourhood smaller than ``gap`` can tell background from object but
not which object: its mIoU plateaus near background IoU plus chance over K-1 classes, well below
a context model.

Labels: background 0, objects and their key strips 1..K-1. A key strip (8 pixels wide, one
feature cell at output stride 8) is easy to classify where it is; the objects it names are not. Sample i of a split is generated from ``numpy.random.default_rng((seed, split, i))``,
so any subset of samples can be generated alone, in any order, identically.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import DatasetInfo, Sample, SampleRef, encode_png

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
KEY_WIDTH = 8  # one feature cell at output stride 8


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 5  # background + 4 object classes
    size: int = 96
    gap: int = 48  # min distance from the keyed border to an object (> 39, tiny's reach)
    max_objects: int = 3
    samples: tuple[tuple[str, int], ...] = (("train", 256), ("val", 64))
    seed: int = 0

    def __post_init__(self) -> None:
        if not 3 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be in [3, 255], got {self.num_classes}")
        if self.size - self.gap < 12:
            raise ValueError(f"size ({self.size}) must exceed gap ({self.gap}) by at least 12 pixels")


def class_colors(num_classes: int) -> np.ndarray:
    """(K, 3) distinct key colours; entry 0 (background) is unused by keys."""
    hues = np.linspace(0, 180, num_classes - 1, endpoint=False).astype(np.uint8)
    import cv2

    hsv = np.stack([hues, np.full_like(hues, 255), np.full_like(hues, 255)], -1)[None]
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
    return np.concatenate([[[0, 0, 0]], rgb]).astype(np.uint8)


def _spans(rng: np.random.Generator, lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    """Up to count disjoint [a, b) spans of 8..24 pixels inside [lo, hi), separated by 2 px."""
    spans, start = [], lo
    for _ in range(count):
        if hi - start < 10:
            break
        length = int(rng.integers(8, min(24, hi - start - 2) + 1))
        a = int(rng.integers(start, hi - length + 1))
        spans.append((a, a + length))
        start = a + length + 2
    return spans


def generate(cfg: SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (S, S, 3) uint8 RGB, label (S, S) uint8) of sample index of split."""
    rng = np.random.default_rng((cfg.seed, SPLIT_IDS.get(split, 3), index))
    S, K = cfg.size, cfg.num_classes
    image = rng.normal(90, 25, (S, S, 3))  # background texture
    label = np.zeros((S, S), np.uint8)
    by_rows = bool(rng.integers(2))
    across = _spans(rng, KEY_WIDTH + 1, S, int(rng.integers(1, cfg.max_objects + 1)))  # rows (or columns)
    colors = class_colors(K)
    for a, b in across:
        cls = int(rng.integers(1, K))
        length = int(rng.integers(min(16, S - cfg.gap), S - cfg.gap + 1))
        c0 = int(rng.integers(cfg.gap, S - length + 1))  # along the other axis, gap from the key
        obj = (slice(a, b), slice(c0, c0 + length)) if by_rows else (slice(c0, c0 + length), slice(a, b))
        key = (slice(a, b), slice(0, KEY_WIDTH)) if by_rows else (slice(0, KEY_WIDTH), slice(a, b))
        shape = image[obj].shape
        image[obj] = 170 + 20 * np.sign(rng.standard_normal(shape[:2]))[..., None]  # object texture
        label[obj] = cls
        image[key] = colors[cls]
        label[key] = cls
    return np.clip(image, 0, 255).astype(np.uint8), label


class Synthetic:
    def __init__(self, cfg: SyntheticConfig | None = None) -> None:
        self.cfg = cfg or SyntheticConfig()
        names = ("background",) + tuple(f"object{k}" for k in range(1, self.cfg.num_classes))
        palette = [(0, 0, 0)] + [tuple(int(v) for v in c) for c in class_colors(self.cfg.num_classes)[1:]]
        self.info = DatasetInfo("synthetic", names, tuple(palette))
        self.splits = tuple(split for split, _ in self.cfg.samples)
        self._counts = dict(self.cfg.samples)

    def list(self, split: str) -> list[SampleRef]:
        if split not in self._counts:
            raise ValueError(f"synthetic split {split!r} not configured; have {sorted(self._counts)}")
        return [SampleRef(f"{split}-{i:06d}", index=i) for i in range(self._counts[split])]

    def load(self, ref: SampleRef) -> Sample:
        split = ref.key.split("-", 1)[0]
        image, label = generate(self.cfg, split, ref.index)
        import cv2

        data = encode_png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        return Sample(ref.key, data, "png", label, image.shape[0], image.shape[1])
