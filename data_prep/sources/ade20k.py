"""ADE20K (SceneParsing, ``ADEChallengeData2016/{images,annotations}/{training,validation}``):
150 classes; annotation 0 ("other") maps to 255 and k to k - 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import IGNORE_INDEX, DatasetInfo, SampleRef, label_lut, load_pair, pair_by_stem
from .files import as_path

# objectInfo150 of the SceneParsing benchmark, in annotation order 1..150
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck",
    "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)
assert len(CLASSES) == 150
SPLITS = {"train": "training", "val": "validation"}


def random_palette(n: int, seed: int = 0) -> tuple[tuple[int, int, int], ...]:
    colors = np.random.default_rng(seed).integers(0, 256, (n, 3))
    return tuple(tuple(int(v) for v in c) for c in colors)


class ADE20K:
    splits = ("train", "val")

    def __init__(self, root: str | Path) -> None:
        root = as_path(root)
        self.root = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        self.info = DatasetInfo("ade20k", CLASSES, random_palette(len(CLASSES)))
        self.lut = label_lut({0: IGNORE_INDEX, **{k: k - 1 for k in range(1, 151)}})

    def list(self, split: str) -> list[SampleRef]:
        sub = SPLITS.get(split, split)
        images = {p.stem: str(p) for p in (self.root / "images" / sub).glob("*.jpg")}
        labels = {p.stem: str(p) for p in (self.root / "annotations" / sub).glob("*.png")}
        return pair_by_stem(images, labels)

    def load(self, ref: SampleRef):
        return load_pair(ref, self.lut)
