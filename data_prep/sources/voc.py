"""Pascal VOC 2012 segmentation: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs
whose indices are the classes, 255 on object borders) and ``ImageSets/Segmentation/{split}.txt``."""

from __future__ import annotations

from pathlib import Path

from .base import IGNORE_INDEX, DatasetInfo, SampleRef, label_lut, load_pair
from .files import as_path

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
           "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor")


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The VOC colour map: the bits of the class index spread over R, G and B."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return tuple(palette)


class VOC:
    splits = ("train", "val")

    def __init__(self, root: str | Path) -> None:
        root = as_path(root)
        nested = root / "VOCdevkit" / "VOC2012"
        self.root = nested if nested.is_dir() else root
        self.info = DatasetInfo("voc", CLASSES, voc_palette(len(CLASSES)))
        self.lut = label_lut({**{k: k for k in range(len(CLASSES))}, IGNORE_INDEX: IGNORE_INDEX})

    def list(self, split: str) -> list[SampleRef]:
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise FileNotFoundError(f"VOC split list {ids_file} not found")
        refs = []
        for key in sorted({line.strip() for line in ids_file.read_text().splitlines() if line.strip()}):
            image, label = self.root / "JPEGImages" / f"{key}.jpg", self.root / "SegmentationClass" / f"{key}.png"
            refs.append(SampleRef(key, str(image) if image.exists() else None, str(label) if label.exists() else None))
        return refs

    def load(self, ref: SampleRef):
        return load_pair(ref, self.lut)
